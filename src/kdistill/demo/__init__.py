"""``kdistill demo``: distill the bundled SmolLM2-135M-Instruct into a student cut from it.

1. make the task's rows in code (training and held-out first names are disjoint);
2. the teacher answers the training prompts (greedy); rows it gets wrong are filtered out;
3. ``kdistill run`` on the embedded config (logit KD on the teacher's answers);
4. a before/after table, samples and the report files.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from kdistill.demo.task import make_rows, split_names

DEMO_ROWS = {"train": 400, "eval": 200}


def demo_config_dict(output_dir: str) -> dict:
    data = yaml.safe_load(resources.files("kdistill.demo").joinpath("demo.yaml").read_text())
    data["output_dir"] = output_dir
    data["data"]["train"] = str(Path(output_dir) / "data" / "train.jsonl")
    data["data"]["eval"] = str(Path(output_dir) / "data" / "eval.jsonl")
    return data


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def prepare_data(cfg, say, progress: bool = True) -> dict:
    """Teacher answers for the demo's prompts -> ``data/train.jsonl`` and ``data/eval.jsonl``.

    Skipped when both files exist (a rerun reuses them).
    """
    from kdistill.data import parse_row
    from kdistill.evaluate import generate, matches
    from kdistill.models import load_model
    from kdistill.pipeline import _renderer

    train_path, eval_path = Path(cfg.data.train), Path(cfg.data.eval)
    stats_path = train_path.parent / "stats.json"
    if train_path.is_file() and eval_path.is_file() and stats_path.is_file():
        return json.loads(stats_path.read_text())
    train_path.parent.mkdir(parents=True, exist_ok=True)
    train_names, test_names = split_names(seed=0)
    rows = {"train": make_rows(DEMO_ROWS["train"], train_names, 1, "train"),
            "eval": make_rows(DEMO_ROWS["eval"], test_names, 2, "eval")}
    t0 = time.time()
    teacher, tok = load_model(cfg.teacher.model, "teacher.model")
    say(f"teacher loaded in {time.time() - t0:.1f} s; it now answers {sum(map(len, rows.values()))} prompts (greedy)")
    renderer = _renderer(cfg, tok)
    stats = {}
    for split, items in rows.items():
        prompts = [renderer.prompt_ids(parse_row(r, split, require_response=False)) for r in items]
        t1 = time.time()
        answers = []
        bs = 32
        it = range(0, len(prompts), bs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"teacher answers ({split})", unit="batch")
        for i in it:
            answers += generate(teacher, tok, prompts[i : i + bs], cfg.eval.max_new_tokens, bs)
        correct = [matches(a, r["reference"]) for a, r in zip(answers, items)]
        for r, a in zip(items, answers):
            r["response"] = a
        kept = [r for r, ok in zip(items, correct) if ok] if split == "train" else items
        stats[split] = {"rows": len(items), "teacher_correct": sum(correct), "kept": len(kept),
                        "seconds": round(time.time() - t1, 1)}
        _write_jsonl(train_path if split == "train" else eval_path, kept)
    stats_path.write_text(json.dumps(stats))
    say(f"teacher answered: train {stats['train']['teacher_correct']}/{stats['train']['rows']} correct "
        f"(kept for training), held-out {stats['eval']['teacher_correct']}/{stats['eval']['rows']}")
    return stats


def run_demo(output_dir: str = "runs/demo", overrides: Optional[list[str]] = None, progress: bool = True) -> dict:
    from kdistill.cli import _say
    from kdistill.config import load_config
    from kdistill.pipeline import run

    cfg = load_config(None, overrides or [], base=demo_config_dict(output_dir))
    _say("demo: distill SmolLM2-135M-Instruct (bundled) into a student cut from it, on first-name extraction")
    t0 = time.time()
    stats = prepare_data(cfg, _say, progress)
    rep = run(cfg, say=_say, progress=progress)
    rep["demo"] = {"data": stats, "total_seconds": round(time.time() - t0, 1)}
    Path(cfg.output_dir, "report.json").write_text(json.dumps(rep, indent=2))
    print_summary(rep, cfg.output_dir)
    return rep


def print_summary(rep: dict, output_dir) -> None:
    """The before/after table, samples and where the files are."""
    from rich.console import Console
    from rich.table import Table

    from kdistill.report import metrics_table

    con = Console()
    t = Table(title="held-out: teacher vs student", show_lines=False)
    for col in ("metric", "teacher", "student (initial)", "student (trained)", "retention"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for row in metrics_table(rep):
        t.add_row(*row)
    con.print(t)
    sp = rep.get("speed") or {}
    if sp.get("teacher") and sp.get("student"):
        con.print(
            f"generation: teacher {sp['teacher']['tokens_per_s']} tok/s, {sp['teacher']['peak_memory_mb']} MB; "
            f"student {sp['student']['tokens_per_s']} tok/s, {sp['student']['peak_memory_mb']} MB"
        )
    for smp in rep.get("samples", []):
        con.print(f"[dim]prompt:[/] {smp['prompt'].splitlines()[-1]}")
        con.print(f"   reference={smp.get('reference')!r} teacher={smp.get('teacher')!r} "
                  f"initial={smp.get('student_initial')!r} trained={smp.get('student')!r}")
    if rep.get("headline"):
        con.print(f"[bold green]{rep['headline']}[/]")
    out = Path(output_dir)
    con.print(f"files: {out / 'student'}/  {out / 'report.md'}  {out / 'report.json'}  "
              + "  ".join(str(out / p) for p in rep.get("plots", ["loss.png", "metrics.png"])))
