"""``kdistill`` command line: parse the arguments and hand the command to its module in
:mod:`kdistill.commands`.

User mistakes (:class:`~kdistill.errors.KDistillError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from kdistill import __version__
from kdistill.commands import cache_teacher, demo, generate
from kdistill.commands import run as run_command
from kdistill.errors import KDistillError

COMMANDS = {"run": run_command, "eval": run_command, "cache-teacher": cache_teacher, "generate": generate,
            "demo": demo}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdistill",
        description="Distill a large language model (teacher) into a small one (student), and report what it kept.",
    )
    p.add_argument("--version", action="version", version=f"kdistill {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(name: str, help_: str):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=10 (repeatable)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        return sp

    with_config("run", "train a student as the config says (method: logit, ...) and write student/ + report")
    with_config("eval", "compare an existing teacher and student on held-out data (report only, no training)")
    with_config("cache-teacher", "white-box, offline: the teacher's top-k log-probs on data.train -> compact shards (resumable)")
    with_config("generate", "the teacher (API or local model) answers prompts -> JSONL (append-only, resumable)")
    demo = sub.add_parser("demo", help="distill the bundled SmolLM2-135M-Instruct teacher on this machine (100 steps; about 10 min on 2 idle CPU cores)",
                          description="The embedded default: a real teacher, a student cut from it, a task, a report.")
    demo.add_argument("--output-dir", default="runs/demo", help="where the run goes (default: runs/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the embedded demo config")
    demo.add_argument("--no-progress", action="store_true")
    return p


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    _setup_logging()
    try:
        return COMMANDS[args.command].main(args)
    except KDistillError as exc:
        print(f"kdistill: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the filesystem (full disk, a folder made read-only): one line, what was saved stays
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"kdistill: error: {where}{exc.strerror or exc} (what was saved before is kept; rerun the same "
              "command once this is fixed)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdistill: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
