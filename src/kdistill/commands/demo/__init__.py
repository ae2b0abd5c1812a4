"""``kdistill demo``: distill the bundled SmolLM2-135M-Instruct into a student cut from it.

1. make the task's rows in code (held-out rows: unseen names; half of them also unseen sentence
   templates and question phrasings, see :mod:`kdistill.commands.demo.task`);
2. the teacher answers every prompt (greedy); training rows it gets wrong under the demo's strict
   scoring (``eval.match: exact``) are filtered out;
3. ``kdistill run`` on the embedded config (logit KD on the teacher's answers, a fixed number of steps);
4. a before/after table, the seen- vs unseen-template figures, samples and the report files.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from kdistill.answer_stats import answer_profile
from kdistill.commands.demo.task import make_rows, split_names
from kdistill.config import load_config
from kdistill.console import print_summary, say
from kdistill.data import Renderer, parse_row
from kdistill.evaluate import matches
from kdistill.models import load_model
from kdistill.run import run
from kdistill.runfolder import is_run_folder
from kdistill.sampling import sample_texts
from kdistill.store import atomic_write, check_own_folder, claim_folder

DEMO_ROWS = {"train": 500, "seen_template": 100, "unseen_template": 100}
DATA_VERSION = 2  # data/ written by an older demo (another task) is made again


def demo_config_dict(output_dir: str) -> dict:
    data = yaml.safe_load(resources.files("kdistill.commands.demo").joinpath("demo.yaml").read_text())
    data["output_dir"] = output_dir
    data["data"]["train"] = str(Path(output_dir) / "data" / "train.jsonl")
    data["data"]["eval"] = str(Path(output_dir) / "data" / "eval.jsonl")
    return data


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def demo_rows() -> dict:
    """``{"train": rows, "eval": rows}``; held-out rows alternate between the two groups."""
    train_names, test_names = split_names(seed=0)
    seen = make_rows(DEMO_ROWS["seen_template"], test_names, 2, "eval-seen", True, group="seen_template")
    unseen = make_rows(DEMO_ROWS["unseen_template"], test_names, 3, "eval-unseen", False, group="unseen_template")
    return {"train": make_rows(DEMO_ROWS["train"], train_names, 1, "train", True),
            "eval": [r for pair in zip(seen, unseen) for r in pair]}


def prepare_data(cfg, say, progress: bool = True) -> dict:
    """Teacher answers for the demo's prompts -> ``data/train.jsonl`` and ``data/eval.jsonl``.

    Skipped when both files exist from this version of the demo (a rerun reuses them).
    """
    check_own_folder(Path(cfg.output_dir), "--output-dir", "run folder", ("config.yaml", "checkpoints"))
    train_path, eval_path = Path(cfg.data.train), Path(cfg.data.eval)
    stats_path = train_path.parent / "stats.json"
    if train_path.is_file() and eval_path.is_file() and stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if stats.get("version") == DATA_VERSION:
            return stats
    out = Path(cfg.output_dir)
    if is_run_folder(out) and any(out.iterdir()):  # a run of an older demo (other data): kept aside, never mixed
        aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        say(f"{out} held a run of an older demo (other data); moved to {aside}")
    claim_folder(out, "run")  # the data goes inside the run's own folder
    train_path.parent.mkdir(parents=True, exist_ok=True)
    rows = demo_rows()
    t0 = time.time()
    teacher, tok = load_model(cfg.teacher.model, "teacher.model")
    say(f"teacher loaded in {time.time() - t0:.1f} s; it now answers {sum(map(len, rows.values()))} prompts (greedy)")
    renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template)
    stats: dict = {"version": DATA_VERSION, "scoring": cfg.eval.match}
    for split, items in rows.items():
        examples = [parse_row(r, split, require_response=False) for r in items]
        prompts = [renderer.prompt_ids(e) for e in examples]
        t1 = time.time()
        answers = []
        bs = 32
        it = range(0, len(prompts), bs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"teacher answers ({split})", unit="batch")
        for i in it:
            answers += sample_texts(teacher, tok, prompts[i : i + bs], cfg.eval.max_new_tokens, bs)
        correct = [matches(a, r["reference"], cfg.eval.match, cfg.eval.answer_regex) for a, r in zip(answers, items)]
        for r, a in zip(items, answers):
            r["messages"] = r["messages"] + [{"role": "assistant", "content": a}]
        kept = [r for r, ok in zip(items, correct) if ok] if split == "train" else items
        stats[split] = {"rows": len(items), "teacher_correct": sum(correct), "kept": len(kept),
                        "teacher_echo_share": answer_profile(examples, answers)["echo_share"],
                        "seconds": round(time.time() - t1, 1)}
        _write_jsonl(train_path if split == "train" else eval_path, kept)
    atomic_write(stats_path, json.dumps(stats))
    say(f"teacher answered ({cfg.eval.match} match): train {stats['train']['teacher_correct']}/{stats['train']['rows']} "
        f"correct (kept for training), held-out {stats['eval']['teacher_correct']}/{stats['eval']['rows']}")
    return stats


def group_lines(rep: dict) -> list[str]:
    """The seen- vs unseen-template figures, and how the answers look, as plain lines."""
    lines = []
    for name, v in (rep.get("tasks") or {}).items():
        t, s, i = v["teacher"].get("accuracy"), v["student"].get("accuracy"), (v.get("student_initial") or {}).get("accuracy")
        ret = v["retention"].get("accuracy")
        lines.append(f"held-out {name.replace('_', ' ')}s: accuracy teacher {t:.1%}, student {s:.1%} (initial "
                     f"{i:.1%}), retention {ret if ret is not None else '–'}" if None not in (t, s, i) else f"{name}: –")
    for who, p in (rep.get("answers") or {}).items():
        lines.append(f"{who} answers: median {p['words']['median']:g} words, echo share {p['echo_share']:.1%}")
    return lines


def main(args) -> int:
    run_demo(args.output_dir, args.overrides, progress=not args.no_progress)
    return 0


def run_demo(output_dir: str = "runs/demo", overrides: Optional[list[str]] = None, progress: bool = True) -> dict:
    cfg = load_config(None, overrides or [], base=demo_config_dict(output_dir))
    say("demo: distill SmolLM2-135M-Instruct (bundled) into a student cut from it, on name extraction "
        f"({cfg.train.max_steps} training steps on any machine: about 10 min on 2 idle CPU cores, longer on a "
        "slower or busy one; it prints its own estimate once training starts)")
    t0 = time.time()
    stats = prepare_data(cfg, say, progress)
    rep = run(cfg, say=say, progress=progress)
    rep["demo"] = {"data": stats, "total_seconds": round(time.time() - t0, 1)}
    Path(cfg.output_dir, "report.json").write_text(json.dumps(rep, indent=2))
    print_summary(rep, cfg.output_dir)
    for line in group_lines(rep):
        say(line)
    say(f"demo finished in {rep['demo']['total_seconds'] / 60:.1f} min")
    return rep
