"""``kdistill run CONFIG`` and ``kdistill eval CONFIG``."""

from __future__ import annotations

from kdistill.config import load_config
from kdistill.console import print_summary, say
from kdistill.run import evaluate, run


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "run":
        rep = run(cfg, say=say, progress=not args.no_progress)
    else:
        rep = evaluate(cfg, say=say)
    print_summary(rep, cfg.output_dir)
    return 0
