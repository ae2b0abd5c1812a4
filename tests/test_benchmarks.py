"""Standard benchmarks through lm-evaluation-harness (real lm-eval, local tasks over JSONL made here):
a multiple-choice and a generation task for teacher, initial and trained student; the table and
retention in both reports; a rerun and `kdistill eval` reuse the kept task results; an API teacher
gets generation tasks only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import WORDS, base_config

pytest.importorskip("lm_eval")

from kdistill.config import load_config  # noqa: E402
from kdistill.eval_settings import BenchmarksConfig  # noqa: E402
from kdistill.lm_eval_bridge import Benchmarks, benchmark_table, metric_values  # noqa: E402


def make_tasks(folder: Path) -> Path:
    """``kd_mc`` (multiple choice: which word comes first) and ``kd_gen`` (generate it), 12 rows each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    mc, gen = [], []
    for _ in range(12):
        a, b, c = rng.sample(WORDS[:26], 3)
        mc.append({"question": f"what is the first name {a} {b}", "choices": [a, b, c], "label": 0})
        gen.append({"question": f"what is the first name {a} {b}", "answer": a})
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
              "doc_to_text: \"{{{{question}}}}\"\n")
    (folder / "kd_mc.yaml").write_text(
        "task: kd_mc\n" + common.format(path=folder / "mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    (folder / "kd_gen.yaml").write_text(
        "task: kd_gen\n" + common.format(path=folder / "gen.jsonl") + "output_type: generate_until\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n")
    return folder


@pytest.fixture(scope="module")
def bench_run(tiny, tmp_path_factory):
    from kdistill.run import run

    root = tmp_path_factory.mktemp("bench")
    tasks = make_tasks(root / "tasks")
    cfg = load_config(None, [], base=base_config(
        tiny, root / "out", train={"max_steps": 3},
        eval={"generate": False, "speed_prompts": 0,
              "benchmarks": {"tasks": [{"name": "kd_mc", "group": "choice"}, "kd_gen"], "include_path": str(tasks),
                             "batch_size": 4}}))
    return root, cfg, run(cfg, say=lambda m: None, progress=False)


def test_benchmarks_table_and_retention_in_both_reports(bench_run):
    root, cfg, rep = bench_run
    b = rep["benchmarks"]
    assert set(b) == {"kd_mc", "kd_gen"} and set(b["kd_mc"]) == {"acc"} and set(b["kd_gen"]) == {"exact_match"}
    for task, metric in (("kd_mc", "acc"), ("kd_gen", "exact_match")):
        row = b[task][metric]
        assert set(row) == {"teacher", "student_initial", "student", "retention"}
        assert all(0.0 <= row[k] <= 1.0 for k in ("teacher", "student_initial", "student"))
        assert row["retention"] == (round(row["student"] / row["teacher"], 4) if row["teacher"] else None)
    kept = json.loads((root / "out" / "report.json").read_text())
    assert kept["benchmarks"] == b and "benchmarks.png" in kept["plots"]
    md = (root / "out" / "report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in md and "| kd_mc | acc |" in md and "| kd_gen | exact_match |" in md
    cap = rep["capabilities"]
    assert [g["name"] for g in cap["groups"]] == ["choice"] and {t["name"] for t in cap["tasks"]} >= {"kd_mc"}
    # the same teacher model gives the same numbers as lm-eval run directly on it (no reimplemented metric)
    assert len(list((root / "out" / "benchmarks").rglob("*.json"))) == 6  # 3 models x 2 tasks


def test_rerun_and_eval_reuse_finished_tasks(bench_run, monkeypatch):
    import lm_eval

    from kdistill.run import evaluate, run

    root, cfg, rep = bench_run
    calls = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k["tasks"]) or real(*a, **k))
    again = run(cfg, say=lambda m: None, progress=False)  # training already complete: same student weights
    assert calls == [] and again["benchmarks"] == rep["benchmarks"]
    ev_cfg = load_config(None, [f"student.model={root / 'out' / 'student'}", "student.init=null",
                                f"output_dir={root / 'out'}"], base=cfg.model_dump(mode="json"))
    ev = evaluate(ev_cfg, say=lambda m: None)
    assert calls == [] and ev["benchmarks"]["kd_mc"]["acc"]["student"] == rep["benchmarks"]["kd_mc"]["acc"]["student"]
    alone = evaluate(load_config(None, ["data.train=null", "data.eval=null"], base=ev_cfg.model_dump(mode="json")),
                     say=lambda m: None)  # kdistill eval on the benchmarks alone (no held-out rows)
    assert calls == [] and alone["benchmarks"] == ev["benchmarks"] and "lm-eval benchmark task" in alone["headline"]
    # a changed task file is a new result, asked again
    gen = root / "tasks" / "gen.jsonl"
    gen.write_text(gen.read_text() + json.dumps({"question": "what is the first name alpha beta", "answer": "alpha"}) + "\n")
    evaluate(ev_cfg, say=lambda m: None)
    assert sorted(t[0] for t in calls) == ["kd_gen", "kd_gen", "kd_mc", "kd_mc"]


def test_api_teacher_runs_generation_tasks_only(tmp_path):
    from fake_openai import FakeOpenAI

    tasks = make_tasks(tmp_path / "tasks")
    server = FakeOpenAI(model="t").start()
    server.responder = lambda msgs: msgs[-1]["content"].split()[5]  # "what is the first name A B" -> A
    try:
        api = load_config(None, [], base={"output_dir": str(tmp_path), "teacher": {"api": {
            "base_url": server.base_url, "model": "t"}}}).teacher.api
        bench = Benchmarks(BenchmarksConfig(tasks=["kd_mc", "kd_gen"], include_path=str(tasks)), tmp_path / "b",
                           say=lambda m: None)
        got, skipped = bench.api("teacher", api)
    finally:
        server.stop()
    assert got == {"kd_gen": {"exact_match": 1.0}} and len(server.requests) == 12
    assert list(skipped) == ["kd_mc"] and "no log-likelihoods" in skipped["kd_mc"]


def test_metric_names_and_retention_direction():
    assert metric_values({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 0.25}) == {
        "acc": 0.5, "exact_match (strict-match)": 0.25}
    t = benchmark_table({"teacher": {"x": {"acc": 0.8, "ppl": 10.0}}, "student": {"x": {"acc": 0.4, "ppl": 20.0}}},
                        {"x": {"acc": True, "ppl": False}})
    assert t["x"]["acc"]["retention"] == 0.5 and t["x"]["ppl"]["retention"] == 0.5
