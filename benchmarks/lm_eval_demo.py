"""lm-evaluation-harness on the demo teacher and its distilled student (``kdistill eval``, benchmarks alone).

A small local task set is made in code (lm-eval task YAMLs over JSONL; no hub):

* ``kd_names_gen``  — generate: the full name in a sentence (exact match), unseen names, and sentence
  templates and question phrasings the demo held out from training;
* ``kd_names_mc``   — multiple choice: which of four full names is in the sentence (same held-out split);
* ``kd_capitals_mc`` — multiple choice: the capital of a country (general knowledge the demo never trains);
* ``kd_sums_mc``    — multiple choice: a sum of two small numbers.

Groups: extraction (the two name tasks), knowledge, arithmetic. Needs ``runs/demo/student`` (``make demo``).
Writes ``runs/lm_eval_demo/`` and the section of ``docs/benchmarks.md``.

    python benchmarks/lm_eval_demo.py [--student runs/demo/student] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

from bench_models import write_section

from kdistill.commands.demo.task import LAST_NAMES, PHRASINGS, TEMPLATES
from kdistill.commands.demo.task import HELD_OUT_PHRASINGS, HELD_OUT_TEMPLATES, split_names
from kdistill.config import load_config
from kdistill.console import say
from kdistill.run import evaluate

CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Poland": "Warsaw", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin",
            "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City", "Chile": "Santiago",
            "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
            "Thailand": "Bangkok", "Argentina": "Buenos Aires", "Turkey": "Ankara", "Australia": "Canberra",
            "Cuba": "Havana", "Belgium": "Brussels"}
ROOT = Path(__file__).resolve().parent.parent


def _yaml(name: str, data: Path, kind: str, text: str, target: str, choice: str = "") -> str:
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            f"doc_to_text: \"{text}\"\ndoc_to_target: {target}\noutput_type: {kind}\n")
    if kind == "multiple_choice":
        return head + f"doc_to_choice: \"{choice}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n" \
                      "    higher_is_better: true\n"
    return head + ("generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                   "    ignore_case: true\n    ignore_punctuation: true\n")


def _one_shot(yaml_text: str) -> str:
    """One worked example from the task's own rows (lm-eval puts it as an earlier chat turn)."""
    return yaml_text + "num_fewshot: 1\nfewshot_split: test\nfewshot_config:\n  sampler: first_n\n"


def make_tasks(folder: Path, n: int = 60) -> Path:
    """The four tasks above as lm-eval YAMLs over JSONL files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    _, test_names = split_names(0)
    tpls, phrs = sorted(HELD_OUT_TEMPLATES), sorted(HELD_OUT_PHRASINGS)
    names = []
    for _ in range(n):
        full = f"{rng.choice(test_names)} {rng.choice(LAST_NAMES)}"
        ask = PHRASINGS[rng.choice(phrs)]
        sentence = TEMPLATES[rng.choice(tpls)].format(name=full)
        others = set()
        while len(others) < 3:
            o = f"{rng.choice(test_names)} {rng.choice(LAST_NAMES)}"
            if o != full:
                others.add(o)
        choices = [full, *sorted(others)]
        rng.shuffle(choices)
        names.append({"question": ask.format(sentence=sentence), "answer": full, "choices": choices,
                      "label": choices.index(full)})
    caps = []
    for country, city in CAPITALS.items():
        others = rng.sample([c for c in CAPITALS.values() if c != city], 3)
        choices = [city, *others]
        rng.shuffle(choices)
        caps.append({"question": f"What is the capital of {country}?", "choices": choices,
                     "label": choices.index(city)})
    sums = []
    for _ in range(40):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        wrong = sorted({a + b + d for d in (-10, -2, -1, 1, 2, 10)} - {a + b})
        choices = [str(a + b), *map(str, rng.sample(wrong, 3))]
        rng.shuffle(choices)
        sums.append({"question": f"What is {a} + {b}?", "choices": choices, "label": choices.index(str(a + b))})
    for fname, rows in (("names.jsonl", names), ("capitals.jsonl", caps), ("sums.jsonl", sums)):
        (folder / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "kd_names_gen.yaml").write_text(_one_shot(_yaml("kd_names_gen", folder / "names.jsonl", "generate_until",
                                                              "{{question}}", "\"{{answer}}\"")))
    (folder / "kd_names_mc.yaml").write_text(_one_shot(_yaml("kd_names_mc", folder / "names.jsonl", "multiple_choice",
                                                             "{{question}}", "label", "{{choices}}")))
    (folder / "kd_capitals_mc.yaml").write_text(_yaml("kd_capitals_mc", folder / "capitals.jsonl", "multiple_choice",
                                                      "Question: {{question}}\\nAnswer:", "label", "{{choices}}"))
    (folder / "kd_sums_mc.yaml").write_text(_yaml("kd_sums_mc", folder / "sums.jsonl", "multiple_choice",
                                                  "Question: {{question}}\\nAnswer:", "label", "{{choices}}"))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=str(ROOT / "runs" / "demo" / "student"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "lm_eval_demo"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if not Path(args.student, "config.json").is_file():
        print(f"no student at {args.student}: run `make demo` first", file=sys.stderr)
        return 2
    tasks = make_tasks(Path(str(args.out) + "-tasks"))  # beside the run folder: kdistill claims that one itself
    groups = {"kd_names_gen": "extraction", "kd_names_mc": "extraction", "kd_capitals_mc": "knowledge",
              "kd_sums_mc": "arithmetic"}
    cfg = load_config(None, [], base={
        "output_dir": args.out, "teacher": {"model": "demo"}, "student": {"model": args.student},
        "data": {"system_prompt": "Reply with the person's full name only."},
        "eval": {"speed_prompts": 0, "benchmarks": {
            "tasks": [{"name": t, "group": g} for t, g in groups.items()], "include_path": str(tasks),
            "batch_size": 16, "apply_chat_template": True, "limit": args.limit}}})
    t0 = time.time()
    rep = evaluate(cfg, say=say)
    seconds = time.time() - t0
    lines = ["## lm-evaluation-harness on the demo teacher and student (`benchmarks/lm_eval_demo.py`)", "",
             f"`python benchmarks/lm_eval_demo.py` = `kdistill eval` with `eval.benchmarks` only (no held-out rows): "
             f"lm-eval {version('lm_eval')} `HFLM` on the demo teacher (SmolLM2-135M-Instruct) and "
             f"`{Path(args.student).relative_to(ROOT) if Path(args.student).is_relative_to(ROOT) else args.student}`, "
             "chat template applied; the name tasks with one worked example (the first row, as an earlier chat turn), "
             "the others 0-shot. "
             "A local task set made in code (lm-eval YAMLs over JSONL, "
             "`runs/lm_eval_demo-tasks/`): `kd_names_gen` (write the full name, exact match after stripping a final "
             "period; 60 rows with unseen names and the demo's held-out sentence templates and phrasings), "
             "`kd_names_mc` (the same 60 sentences: which of four names is in it), `kd_capitals_mc` (30 capitals, "
             "four choices) and `kd_sums_mc` (40 sums of two numbers below 50, four choices). The demo trains only "
             "name extraction: the other two show what the cut student kept of the teacher's general skills.", "",
             "| task | group | metric | teacher | student | retention |", "|---|---|---|---|---|---|"]
    for task, metrics in rep["benchmarks"].items():
        for m, row in metrics.items():
            f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"| {task} | {groups[task]} | {m} | {f(row.get('teacher'))} | {f(row.get('student'))} | "
                         f"{f(row.get('retention'))} |")
    cap = rep.get("capabilities") or {}
    if cap:
        lines += ["", f"Capability groups (retention floor {cap['floor']}): " + "; ".join(
            f"{g['name']} {g['retention']:.2f}{' (below floor)' if g['below_floor'] else ''}" for g in cap["groups"])
            + "."]
    lines += ["", f"Wall time {seconds / 60:.1f} min for both models on this 2-core CPU (load-dependent; "
              "a rerun reads every finished task back from `runs/lm_eval_demo/benchmarks/`).", ""]
    write_section(Path(args.docs), "\n".join(lines), lines[0])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
