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

from kdistill.commands.demo.task import make_rows, split_names
from kdistill.config import load_config
from kdistill.console import print_summary, say
from kdistill.data import Renderer, parse_row
from kdistill.evaluate import matches
from kdistill.models import load_model
from kdistill.run import run
from kdistill.sampling import sample_texts
from kdistill.store import atomic_write, check_own_folder, claim_folder

DEMO_ROWS = {"train": 400, "eval": 200}


def demo_config_dict(output_dir: str) -> dict:
    data = yaml.safe_load(resources.files("kdistill.commands.demo").joinpath("demo.yaml").read_text())
    data["output_dir"] = output_dir
    data["data"]["train"] = str(Path(output_dir) / "data" / "train.jsonl")
    data["data"]["eval"] = str(Path(output_dir) / "data" / "eval.jsonl")
    return data


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def prepare_data(cfg, say, progress: bool = True) -> dict:
    """Teacher answers for the demo's prompts -> ``data/train.jsonl`` and ``data/eval.jsonl``.

    Skipped when both files exist (a rerun reuses them).
    """
    check_own_folder(Path(cfg.output_dir), "--output-dir", "run folder", ("config.yaml", "checkpoints"))
    train_path, eval_path = Path(cfg.data.train), Path(cfg.data.eval)
    stats_path = train_path.parent / "stats.json"
    if train_path.is_file() and eval_path.is_file() and stats_path.is_file():
        return json.loads(stats_path.read_text())
    claim_folder(Path(cfg.output_dir), "run")  # the data goes inside the run's own folder
    train_path.parent.mkdir(parents=True, exist_ok=True)
    train_names, test_names = split_names(seed=0)
    rows = {"train": make_rows(DEMO_ROWS["train"], train_names, 1, "train"),
            "eval": make_rows(DEMO_ROWS["eval"], test_names, 2, "eval")}
    t0 = time.time()
    teacher, tok = load_model(cfg.teacher.model, "teacher.model")
    say(f"teacher loaded in {time.time() - t0:.1f} s; it now answers {sum(map(len, rows.values()))} prompts (greedy)")
    renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template)
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
            answers += sample_texts(teacher, tok, prompts[i : i + bs], cfg.eval.max_new_tokens, bs)
        correct = [matches(a, r["reference"]) for a, r in zip(answers, items)]
        for r, a in zip(items, answers):
            r["response"] = a
        kept = [r for r, ok in zip(items, correct) if ok] if split == "train" else items
        stats[split] = {"rows": len(items), "teacher_correct": sum(correct), "kept": len(kept),
                        "seconds": round(time.time() - t1, 1)}
        _write_jsonl(train_path if split == "train" else eval_path, kept)
    atomic_write(stats_path, json.dumps(stats))
    say(f"teacher answered: train {stats['train']['teacher_correct']}/{stats['train']['rows']} correct "
        f"(kept for training), held-out {stats['eval']['teacher_correct']}/{stats['eval']['rows']}")
    return stats


def main(args) -> int:
    run_demo(args.output_dir, args.overrides, progress=not args.no_progress)
    return 0


def run_demo(output_dir: str = "runs/demo", overrides: Optional[list[str]] = None, progress: bool = True) -> dict:
    cfg = load_config(None, overrides or [], base=demo_config_dict(output_dir))
    say("demo: distill SmolLM2-135M-Instruct (bundled) into a student cut from it, on first-name extraction")
    t0 = time.time()
    stats = prepare_data(cfg, say, progress)
    rep = run(cfg, say=say, progress=progress)
    rep["demo"] = {"data": stats, "total_seconds": round(time.time() - t0, 1)}
    Path(cfg.output_dir, "report.json").write_text(json.dumps(rep, indent=2))
    print_summary(rep, cfg.output_dir)
    return rep
