"""kdistill against TRL's GKDTrainer on the same pair, data and settings. Run by hand (not in ``make test``):

    nice -n 15 .venv/bin/python benchmarks/vs_trl.py                        # the full race (~1 h on 2 cores)
    nice -n 15 .venv/bin/python benchmarks/vs_trl.py --write docs/benchmarks.md
    .venv/bin/python benchmarks/vs_trl.py --steps 2 --warmup 1 --rows 64     # a quick end-to-end check

The first run builds TRL's own virtual environment in ``.bench/trl-venv`` (gitignored): the same
torch and transformers as kdistill's, plus ``trl==1.16.0`` (``--trl-venv`` to use another).

Same for both tools: the demo teacher (SmolLM2-135M-Instruct, fp32) -> a 14-layer cut of it (evenly
spaced layers, saved once, loaded by both), ``--rows`` rows of the demo's name-extraction task
(responses of varied length, rendered with the chat template and the same system prompt), batch 8,
max length 128, generalized JSD with beta 0.5 at T = 1 (no hard-label term), AdamW at a constant
learning rate, 2 CPU threads, ``--warmup`` untimed steps then ``--steps`` timed ones. Cases:

* **A**: off-policy KD on the data (TRL ``lmbda=0``; kdistill ``method: logit``);
* **B**: on-policy, 32 tokens sampled from the student at T = 1 (TRL ``lmbda=1``; kdistill
  ``method: on_policy`` with ``lambda: 1``);
* **A-cache**: case A for kdistill trained from an offline top-64 teacher cache (no teacher in
  memory; built once by ``kdistill cache-teacher``, its time reported apart). TRL has no counterpart.

Every case runs in a fresh process (peak memory = that process's peak resident set, model loads
included); the cases run in alternating order (kdistill first, then TRL first, ...). A step's time
is the wall time between the ends of consecutive optimizer steps (data loading and logging
included). tokens/s = trained tokens (those the loss averages over) per second. The shuffles of the
two tools differ, so their losses are not over the same batches step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEM = "You are a helpful assistant."
TRL_VERSION = "1.16.0"
LR = 5e-5
GOALS = {"A": 2.0, "B": 1.5}  # tokens/s vs TRL
MEM_GOAL = 0.75


# ---------------------------------------------------------------------------------------------
# workers (each case runs in its own process; the TRL worker imports nothing from kdistill)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def worker_kdistill(case: str, work: Path, steps: int, threads: int) -> dict:
    import torch

    from kdistill.commands.cache_teacher import cache_teacher
    from kdistill.config import load_config
    from kdistill.run import run

    torch.set_num_threads(threads)
    out = work / f"kdistill-{case}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = {
        "output_dir": str(out), "method": "on_policy" if case == "B" else "logit",
        "teacher": {"model": str(work / "teacher")}, "student": {"model": str(work / "student")},
        "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"), "max_length": 128,
                 "system_prompt": SYSTEM, "max_eval_rows": 2},
        "loss": {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "alpha": 1.0},
        "train": {"max_steps": steps, "batch_size": 8, "learning_rate": LR, "lr_scheduler": "constant",
                  "save_every": 100000, "num_threads": threads, "seed": 0, "max_grad_norm": 1.0},
        "eval": {"generate": False, "speed_prompts": 0, "batch_size": 2},
    }
    extra = {}
    if case == "B":
        cfg["on_policy"] = {"lambda": 1.0, "max_new_tokens": 32, "temperature": 1.0}
    if case == "A-cache":
        cache = work / "cache"
        if not (cache / "manifest.json").is_file():
            t0 = time.time()
            ccfg = load_config(None, [], base={**cfg, "teacher": {"model": str(work / "teacher"), "cache": str(cache)},
                                               "student": None, "cache": {"top_k": 64, "batch_size": 8}})
            st = cache_teacher(ccfg, say=lambda m: print(m, file=sys.stderr), progress=False)
            extra["cache_teacher_s"] = round(time.time() - t0, 1)
            extra["cache_bytes_per_token"] = st["bytes_per_token"]
        cfg["teacher"] = {"cache": str(cache)}
    rep = run(load_config(None, [], base=cfg), say=lambda m: print(m, file=sys.stderr), progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    ends = [r["elapsed_s"] for r in rows]
    return {"step_s": [b - a for a, b in zip([0.0] + ends[:-1], ends)], "tokens": [r["items"] for r in rows],
            "losses": [r["loss"] for r in rows], "padding": [r.get("padding") for r in rows],
            "split": {k: [r.get(k, 0.0) for r in rows] for k in ("sample_s", "teacher_s", "update_s")},
            "mfu": [r.get("mfu") for r in rows], "peak_rss_gb": round(_peak_rss_gb(), 3),
            "throughput": rep["training"].get("throughput"), **extra}


def worker_trl(case: str, work: Path, steps: int, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # older TRL
        from trl import GKDConfig, GKDTrainer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = [json.loads(l) for l in (work / "train.jsonl").read_text().splitlines() if l.strip()]
    data = Dataset.from_list([{"messages": [{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}]} for r in rows])
    tok = AutoTokenizer.from_pretrained(work / "student")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    args = GKDConfig(
        output_dir=str(work / f"trl-{case}"), per_device_train_batch_size=8, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], bf16=False, fp16=False, use_cpu=True, seed=0, max_length=128,
        lmbda=1.0 if case == "B" else 0.0, beta=0.5, temperature=1.0, max_new_tokens=32, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    ends, tokens, losses = [], [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, *a, **kw)

    trainer = Counting(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok,
                       callbacks=[Timer()])
    trainer.train()
    return {"step_s": [b - a for a, b in zip(ends[:-1], ends[1:])], "tokens": tokens, "losses": losses,
            "peak_rss_gb": round(_peak_rss_gb(), 3)}


# ---------------------------------------------------------------------------------------------
# setup


def trl_python(venv: Path) -> Path:
    """TRL's interpreter, building its venv (same torch and transformers as kdistill's) when missing."""
    py = venv / "bin" / "python"
    if py.is_file():
        return py
    import torch
    import transformers

    print(f"building {venv} (TRL {TRL_VERSION}, torch {torch.__version__.split('+')[0]}, transformers "
          f"{transformers.__version__}) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + [f"trl=={TRL_VERSION}", f"transformers=={transformers.__version__}", "accelerate", "datasets"],
                   check=True)
    return py


def prepare(work: Path, rows: int, student_layers: int) -> None:
    """The shared inputs: ``teacher/``, ``student/`` (a cut of it), ``train.jsonl``, ``eval.jsonl``."""
    sys.path.insert(0, str(HERE))
    from bench_models import teacher_and_student
    from cache import _rows

    work.mkdir(parents=True, exist_ok=True)
    # one user turn and the answer per row (the demo rows' worked example dropped): the same plain
    # prompt/response pairs for both tools
    data = [{"id": r["id"], "prompt": next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user"),
             "response": r["response"], "reference": r.get("reference")} if "messages" in r else r
            for r in _rows(rows + 4)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:rows]))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[rows:]))
    if (work / "student" / "config.json").is_file() and (work / "teacher" / "config.json").is_file():
        return
    teacher, student, tok, name = teacher_and_student(student_layers)
    for model, folder in ((teacher, "teacher"), (student, "student")):
        model.save_pretrained(work / folder)
        tok.save_pretrained(work / folder)
    (work / "pair.json").write_text(json.dumps({"teacher": name, "student_layers": student_layers}))


def run_case(python: Path, tool: str, case: str, args) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", tool, "--case", case, "--work", str(args.work),
           "--steps", str(args.steps + args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    load0 = os.getloadavg()[0]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{tool} {case} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(wall_s=round(time.time() - t0, 1), load_avg=(round(load0, 1), round(os.getloadavg()[0], 1)))
    print(f"{tool} {case}: {statistics.mean(res['step_s'][args.warmup:]):.2f} s/step, peak {res['peak_rss_gb']} GB "
          f"(load {res['load_avg']})", file=sys.stderr)
    return res


# ---------------------------------------------------------------------------------------------
# report


def summarize(res: dict, warmup: int) -> dict:
    timed = res["step_s"][warmup:]
    toks = res["tokens"][warmup:] if len(res["tokens"]) >= len(res["step_s"]) else res["tokens"]
    out = {"s_per_step": statistics.mean(timed), "tokens_per_s": sum(toks[: len(timed)]) / sum(timed),
           "peak_gb": res["peak_rss_gb"], "first_loss": res["losses"][0], "last_loss": res["losses"][-1]}
    if res.get("padding"):
        out["padding"] = statistics.mean(p for p in res["padding"][warmup:] if p is not None)
    if res.get("split"):
        tot = {k: sum(v[warmup:]) for k, v in res["split"].items()}
        s = sum(tot.values()) or 1.0
        out["split"] = {k.replace("_s", ""): v / s for k, v in tot.items()}
    if res.get("mfu"):
        out["mfu"] = statistics.mean(m for m in res["mfu"][warmup:] if m is not None)
    return out


def markdown(results: dict, args, meta: dict) -> str:
    cmd = "nice -n 15 .venv/bin/python benchmarks/vs_trl.py" + "".join(
        f" {a}" for a in sys.argv[1:] if not a.startswith("--write"))
    lines = [
        "## kdistill vs TRL (`benchmarks/vs_trl.py`)", "",
        f"Command: `{cmd}` ({args.threads} CPU threads, {meta['machine']}; TRL {meta['trl']}). 1-minute load "
        f"averages before/after each case: {meta['loads']} — on a shared machine the absolute times are inflated and "
        "both tools slow down several-fold when another job takes a core; rerun on a quiet machine for the figures "
        "that count.", "",
        f"Pair: {meta['teacher']} -> {meta['student_layers']}-layer cut (fp32), {args.rows} rows of the demo task, "
        f"batch 8, max length 128, generalized JSD beta 0.5 at T 1, {args.warmup} warm-up + {args.steps} timed steps; "
        "kdistill with its defaults (length-grouped batches, fused loss, lean sampling loop).", "",
        "| case | tool | s/step | trained tokens/s | peak memory (GB) | first / last loss | padding | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, by_tool in results.items():
        for tool, s in by_tool.items():
            lines.append(f"| {case} | {tool} | {s['s_per_step']:.2f} | {s['tokens_per_s']:.1f} | {s['peak_gb']:.2f} | "
                         f"{s['first_loss']:.4f} / {s['last_loss']:.4f} | "
                         + (f"{s['padding']:.1%}" if "padding" in s else "–") + " | "
                         + (f"{s['mfu']:.2%}" if "mfu" in s else "–") + " |")
    lines += ["", "| case | tokens/s kdistill / TRL (goal) | s/step TRL / kdistill | peak memory kdistill / TRL "
              f"(goal <= {MEM_GOAL}) | reached |", "|---|---|---|---|---|"]
    for case, by_tool in results.items():
        kd = by_tool.get("kdistill")
        trl = by_tool.get("TRL") or (results.get("A", {}).get("TRL") if case == "A-cache" else None)
        if kd is None or trl is None:
            continue
        goal = GOALS.get(case[0])
        tps = kd["tokens_per_s"] / trl["tokens_per_s"]
        mem = kd["peak_gb"] / trl["peak_gb"]
        ok = (tps >= goal) and (mem <= MEM_GOAL)
        lines.append(f"| {case}{' (vs TRL A)' if case == 'A-cache' else ''} | **{tps:.2f}x** (>= {goal}x) | "
                     f"{trl['s_per_step'] / kd['s_per_step']:.2f}x | **{mem:.2f}** | "
                     + ("yes" if ok else "no: " + ", ".join(x for x, bad in (("speed", tps < goal), ("memory", mem > MEM_GOAL))
                                                          if bad)) + " |")
    for case, by_tool in results.items():
        kd = by_tool.get("kdistill")
        if kd and kd.get("split"):
            sp = kd["split"]
            lines.append("")
            lines.append(f"kdistill {case}: step time split sampling {sp['sample']:.0%}, teacher {sp['teacher']:.0%}, "
                         f"update {sp['update']:.0%}.")
    if meta.get("cache"):
        lines += ["", f"A-cache: `cache-teacher` took {meta['cache'].get('cache_teacher_s')} s for {args.rows} rows "
                      f"({meta['cache'].get('cache_bytes_per_token')} bytes per token), outside the timed steps."]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cases", default="A,B,A-cache")
    ap.add_argument("--repeats", type=int, default=1, help="rounds, the order alternating each time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student-layers", type=int, default=14)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "vs-trl")
    ap.add_argument("--trl-venv", type=Path, default=ROOT / ".bench" / "trl-venv")
    ap.add_argument("--write", help="replace the 'kdistill vs TRL' section of this markdown file")
    ap.add_argument("--worker", choices=["kdistill", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = worker_kdistill if args.worker == "kdistill" else worker_trl
        print(json.dumps(fn(args.case, args.work, args.steps, args.threads)))
        return 0

    trl_py = trl_python(args.trl_venv)
    prepare(args.work, args.rows, args.student_layers)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    runs = []
    for rep in range(args.repeats):
        for i, case in enumerate(cases):
            tools = ["kdistill"] + ([] if case == "A-cache" else ["TRL"])
            if (rep + i) % 2:
                tools.reverse()  # alternate who goes first
            runs += [(case, t) for t in tools]
    raw: dict = {}
    for case, tool in runs:
        py = Path(sys.executable) if tool == "kdistill" else trl_py
        raw.setdefault(case, {}).setdefault(tool, []).append(run_case(py, tool.lower(), case, args))
    results = {}
    for case, by_tool in raw.items():
        results[case] = {}
        for tool, reps in by_tool.items():
            summ = [summarize(r, args.warmup) for r in reps]
            results[case][tool] = {k: (statistics.mean(s[k] for s in summ) if isinstance(summ[0][k], float) else summ[0][k])
                                   for k in summ[0]}
    import torch

    trl_ver = subprocess.run([str(trl_py), "-c", "import trl; print(trl.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    pair = json.loads((args.work / "pair.json").read_text()) if (args.work / "pair.json").is_file() else {}
    meta = {"machine": f"{platform.machine()}, torch {torch.__version__}", "trl": trl_ver,
            "teacher": pair.get("teacher", "demo teacher"), "student_layers": pair.get("student_layers", args.student_layers),
            "loads": "; ".join(f"{c} {t}: {r['load_avg'][0]}/{r['load_avg'][1]}" for c, bt in raw.items()
                               for t, rs in bt.items() for r in rs),
            "cache": next((r for r in raw.get("A-cache", {}).get("kdistill", []) if "cache_teacher_s" in r), None)}
    md = markdown(results, args, meta)
    print(md)
    (args.work / "results.json").write_text(json.dumps({"raw": raw, "summary": results}, indent=1))
    if args.write:
        sys.path.insert(0, str(HERE))
        from bench_models import write_section

        write_section(Path(args.write), md, "## kdistill vs TRL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
