"""A teacher served over HTTP (``teacher.api.logprobs``): training time with and without prefetch.
Run by hand, never as a test:

    .venv/bin/python benchmarks/served_teacher.py                   # prints a markdown table
    .venv/bin/python benchmarks/served_teacher.py --write docs/benchmarks.md

Setup: a local stand-in for a remote vLLM server (``tests/fake_openai.py``) that answers
``/v1/completions`` with ``prompt_logprobs`` in vLLM's format after a fixed latency per request
(``--latency``, the time a busy large-model server takes). Its answers are the demo teacher's
real top-k log-probs, computed once in an untimed warm-up run and then served from memory, so the
server costs no CPU while the student trains (as a server on other machines would). The student
(layers cut from the demo teacher, or a synthetic model when the demo teacher is not installed)
trains ``method: logit`` through ``kdistill.run.run``; the figure is the trainer's own time
(``training.seconds``), runs alternating between the two settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_models import teacher_and_student, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _rows(n: int, seed: int) -> list[dict]:
    from kdistill.commands.demo.task import make_rows, split_names

    rows = make_rows(n, split_names(seed)[0], seed, "bench")
    for r in rows:
        r["response"] = f"The first name is {r['reference']}."
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per request")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--student-layers", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting (alternating)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", help="replace the 'Served teacher' section of this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fake_openai import FakeOpenAI, model_prompt_logprobs
    from kdistill.config import load_config
    from kdistill.run import run

    teacher, student, tok, name = teacher_and_student(args.student_layers)
    teacher.eval()
    tmp = Path(tempfile.mkdtemp(prefix="kd-served-"))
    student.save_pretrained(tmp / "student")
    tok.save_pretrained(tmp / "student")
    n_rows = args.steps * args.batch_size
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n_rows, 0)))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(4, 1)))

    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    srv = FakeOpenAI(model="served-teacher")
    srv.prompt_logprobs = model_prompt_logprobs(teacher, memo=True)
    srv.tokenize = lambda text: tok.encode(text, add_special_tokens=False)
    srv.start()

    def one(prefetch: bool, tag: str) -> dict:
        cfg = {
            "output_dir": str(tmp / tag), "method": "logit",
            "teacher": {"api": {"base_url": srv.base_url, "model": "served-teacher", "logprobs": args.top_k,
                                "prefetch": prefetch, "max_concurrency": args.batch_size}},
            "student": {"model": str(tmp / "student")},
            "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "max_length": 128},
            "loss": {"divergence": "forward_kl", "temperature": 1.0, "alpha": 1.0},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-4,
                      "num_threads": args.threads, "save_every": 10_000},
            "eval": {"generate": False, "speed_prompts": 0},
        }
        rep = run(load_config(base=cfg), say=lambda _: None, progress=False)
        return {"seconds": rep["training"]["seconds"], **rep["method_summary"]["served_teacher"]}

    try:
        srv.delay = 0.0
        one(False, "warmup")  # fills the server's memo: timed runs cost the server no CPU
        srv.delay = args.latency
        times: dict[bool, list[float]] = {False: [], True: []}
        last: dict = {}
        for i in range(args.repeats):
            for prefetch in (False, True):
                r = one(prefetch, f"run{i}-{prefetch}")
                times[prefetch].append(r["seconds"])
                last[prefetch] = r
    finally:
        srv.stop()
    off, on = statistics.median(times[False]), statistics.median(times[True])
    shown = [a for i, a in enumerate(argv or []) if not a.startswith("--write")
             and not (i > 0 and (argv or [])[i - 1] == "--write")]
    cmd = " ".join([".venv/bin/python benchmarks/served_teacher.py", *shown])
    md = "\n".join([
        "## Served teacher: prefetch (`benchmarks/served_teacher.py`)",
        "",
        f"Command: `{cmd}` ({args.threads} CPU threads, {platform.machine()}, torch {torch.__version__}; "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        f"Teacher: {name}, behind a stand-in vLLM server that answers each `/v1/completions` request with the "
        f"teacher's top-{args.top_k} `prompt_logprobs` after {args.latency:g} s (precomputed, so the server uses no CPU "
        f"while the student trains). Student: {args.student_layers} of its layers, `method: logit`, "
        f"{args.steps} steps of batch {args.batch_size} (one request per row, {args.batch_size} in flight). "
        f"Training time as the trainer reports it, median of {args.repeats} alternating runs per setting.",
        "",
        "| teacher.api.prefetch | training time (s) | s/step | batches asked for ahead |",
        "|---|---|---|---|",
        f"| false | {off:.1f} | {off / args.steps:.2f} | {last[False]['prefetched_batches']} |",
        f"| true | {on:.1f} | {on / args.steps:.2f} | {last[True]['prefetched_batches']} |",
        "",
        f"Prefetch: **{on / off:.2f}x** the training time. The next step's log-probs are requested while the "
        "student trains on this one, so a step costs about max(student step, server latency) instead of their sum.",
        "",
    ])
    print(md)
    print(json.dumps({"off": times[False], "on": times[True]}), file=sys.stderr)
    if args.write:
        write_section(Path(args.write), md, "## Served teacher")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
