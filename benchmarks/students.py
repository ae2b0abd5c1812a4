"""Students at half the demo teacher's size: depth-only vs width-only vs the searched depth+width
cut, after the same distillation. Run by hand, never as a test:

    .venv/bin/python benchmarks/students.py                          # prints the tables
    .venv/bin/python benchmarks/students.py --write docs/benchmarks.md

Setup: the demo teacher (SmolLM2-135M-Instruct, 30 layers) and the demo's task (full-name
extraction, strict exact-match scoring; the teacher answers the prompts, the training rows it gets
wrong are dropped, held-out rows use other first names, half of them unseen sentence templates).
The searched run cuts its student with ``student.init.search`` (``target_params``, generated
candidates: depth-only, width-only and two depth+width mixes, each probed for ``--probe-steps`` distillation steps); the depth-only and width-only runs use exactly the
search's depth-only and width-only candidates (same budget). Every student is then distilled the
same way: the demo's ``method: logit`` config (forward KL + cross-entropy, alpha 0.5, lr 3e-4,
batch 8), ``--steps`` optimizer steps, no time limit. Layers are chosen by block importance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from bench_models import write_section

HEADING = "## Students at half the teacher's size"


def _config(out: Path, data: Path, init: dict, steps: int) -> dict:
    from kdistill.commands.demo import demo_config_dict

    cfg = demo_config_dict(str(out))
    cfg["data"]["train"], cfg["data"]["eval"] = str(data / "train.jsonl"), str(data / "eval.jsonl")
    cfg["student"]["init"] = {"from_teacher": True, "layer_selection": "importance", **init}
    cfg["train"].update({"max_steps": steps, "max_minutes": None, "save_every": steps, "log_every": 1})
    return cfg


def _row(name: str, rep: dict) -> dict:
    s, t = rep["student"], rep["teacher"]
    m, m0 = s["metrics"], rep["student_initial"]["metrics"]
    init = s.get("init") or {}
    width = ", ".join(f"{a} {v['size']}" for a, v in (init.get("width") or {}).items()) or "full"
    return {"student": name, "layers": len(init.get("layers") or []), "width": width, "params": s["params"],
            "share": s["params"] / t["params"], "accuracy": m.get("accuracy"), "accuracy_initial": m0.get("accuracy"),
            "perplexity": m["perplexity"], "kl": m["kl_to_teacher"], "kl_initial": m0["kl_to_teacher"],
            "top1": m.get("top1_agreement"), "tokens_per_s": (rep.get("speed") or {}).get("student", {}).get("tokens_per_s"),
            "train_s": rep["training"]["seconds"]}


def _markdown(rows: list[dict], teacher: dict, search: dict, args, seconds: float) -> str:
    load = os.getloadavg()
    lines = [HEADING, "",
             f"Command: `.venv/bin/python benchmarks/students.py --steps {args.steps} --probe-steps "
             f"{args.probe_steps} --train-rows {args.train_rows} --eval-rows {args.eval_rows} --target {args.target}`"
             f" ({seconds / 60:.0f} min in all; {platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; 1-minute load average {load[0]:.1f} at the end"
             + (": other jobs shared the cores, so tokens/s and seconds are inflated and noisy — rerun on a quiet "
                "machine for speed" if load[0] > (os.cpu_count() or 2) + 0.5 else ": no other heavy job ran")
             + "; accuracy, perplexity and KL do not depend on load).", "",
             f"Teacher: SmolLM2-135M-Instruct (demo teacher), {teacher['params']:,} parameters, held-out accuracy "
             f"{teacher['metrics'].get('accuracy', 0):.1%}, perplexity {teacher['metrics']['perplexity']:.2f}. "
             f"Budget: {args.target:.0%} of its parameters. Every student: demo `method: logit` config, {args.steps} "
             f"steps of batch 8 on {args.train_rows} teacher-answered rows (those it got right), measured on "
             f"{args.eval_rows} held-out rows with unseen first names (half with unseen templates), scored strictly (`eval.match: exact`).", "",
             "| student | layers | width kept | params | share | accuracy ↑ (initial) | perplexity ↓ | "
             "KL to teacher ↓ (initial) | top-1 agreement ↑ | tokens/s (load-sensitive) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['layers']} | {r['width']} | {r['params']:,} | {r['share']:.1%} | "
                     f"{r['accuracy']:.1%} ({r['accuracy_initial']:.1%}) | {r['perplexity']:.2f} | "
                     f"{r['kl']:.3f} ({r['kl_initial']:.3f}) | {r['top1']:.3f} | {r['tokens_per_s']} | {r['train_s']:.0f} |")
    lines += ["", f"The search ({search['probe_steps']} probe steps per candidate, forward KL scored on "
              f"{search['probe_eval_rows']} training rows held out from the probe):", "",
              "| candidate | layers | width (mlp, hidden) | params | probe KL before | probe KL after | probe s |",
              "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(search["candidates"]):
        w = ", ".join(f"{f:g}" for f in c["width"].values()) or "1, 1"
        lines.append(f"| {c['kind']}{' **(kept)**' if i == search['chosen'] else ''} | {c['num_layers']} | {w} | "
                     f"{c['params']:,} | {c['kl_before']:.3f} | {c['kl_after']:.3f} | {c['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-students")
    ap.add_argument("--steps", type=int, default=40, help="distillation steps per student")
    ap.add_argument("--probe-steps", type=int, default=8, help="search probe steps per candidate")
    ap.add_argument("--train-rows", type=int, default=160)
    ap.add_argument("--eval-rows", type=int, default=80)
    ap.add_argument("--target", type=float, default=0.5, help="parameter budget: share of the teacher")
    ap.add_argument("--write", help="replace this benchmark's section of a markdown file (e.g. docs/benchmarks.md)")
    args = ap.parse_args(argv)
    t0 = time.time()

    from kdistill.commands import demo
    from kdistill.config import load_config
    from kdistill.console import say
    from kdistill.run import run

    out = Path(args.out)
    data = out / "data"
    half = args.eval_rows // 2  # held-out rows: half with the training templates, half with unseen ones
    demo.DEMO_ROWS.update({"train": args.train_rows, "seen_template": half, "unseen_template": args.eval_rows - half})
    prep = load_config(None, [], base=_config(out / "prep", data, {"num_layers": 2}, 1))
    demo.prepare_data(prep, say, progress=False)

    search = {"target_params": args.target, "probe_steps": args.probe_steps}
    runs: dict = {}
    cfg = load_config(None, [], base=_config(out / "searched", data, {"search": search}, args.steps))
    runs["searched"] = run(cfg, say=say, progress=False)
    table = runs["searched"]["student"]["init"]["search"]
    chosen = table["candidates"][table["chosen"]]
    for kind, name in (("depth-only", "depth-only"), ("width-only", "width-only")):
        cand = next(c for c in table["candidates"] if c["kind"] == kind)
        if cand is chosen:
            runs[name] = runs["searched"]
            continue
        init = {"num_layers": cand["num_layers"]} if kind == "depth-only" else {"width": cand["width"]}
        runs[name] = run(load_config(None, [], base=_config(out / name, data, init, args.steps)), say=say,
                         progress=False)
    rows = [_row(n, runs[n]) for n in ("depth-only", "width-only")]
    rows.append(_row(f"searched ({chosen['kind']})", runs["searched"]))
    md = _markdown(rows, runs["searched"]["teacher"], table, args, time.time() - t0)
    print(md)
    (out / "results.json").write_text(json.dumps({"rows": rows, "search": table}, indent=1))
    if args.write:
        write_section(Path(args.write), md, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
