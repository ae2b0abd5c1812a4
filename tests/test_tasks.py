"""Multi-task data (data.tasks): mixing by weight, held-out rows per task, per-task retention."""

from __future__ import annotations

import json

import pytest

from conftest import base_config, make_rows, write_jsonl
from kdistill.config import load_config
from kdistill.data import Example, mix_tasks, tag_task
from kdistill.errors import ConfigError
from kdistill.run import run

QUIET = {"speed_prompts": 0, "max_new_tokens": 3}


def _rows(n, task):
    return tag_task([Example(f"r{i}", [{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(n)], task)


def test_mix_tasks_reaches_the_weights_and_keeps_ids_unique():
    rows = _rows(10, "a") + _rows(30, "b")
    mixed, stats = mix_tasks(rows, {"a": 3.0, "b": 1.0}, seed=0)
    assert len(mixed) == 40 and len({e.id for e in mixed}) == 40
    a = [e for e in mixed if e.extra["task"] == "a"]
    assert len(a) == 30 and sum(e.id.endswith("~3") for e in a) == 10  # three whole copies
    assert stats == {"a": {"rows": 10, "used": 30, "share": 0.75}, "b": {"rows": 30, "used": 10, "share": 0.25}}
    again, _ = mix_tasks(rows, {"a": 3.0, "b": 1.0}, seed=0)
    assert [e.id for e in again] == [e.id for e in mixed]  # seeded
    assert all(e.id.startswith(("a/", "b/")) for e in mixed)


@pytest.mark.parametrize("data,msg", [
    ({"train": "x.jsonl", "tasks": [{"name": "a", "train": "a.jsonl"}]}, "either tasks or train/eval"),
    ({"tasks": [{"name": "a", "train": "a.jsonl"}, {"name": "a", "train": "b.jsonl"}]}, "unique (repeated: a)"),
    ({"tasks": [{"name": "a", "train": "a.jsonl", "weight": 1}, {"name": "b", "train": "b.jsonl"}]}, "to every task"),
    ({"tasks": [{"name": "a/b", "train": "a.jsonl"}]}, "may not contain '/'"),
])
def test_task_config_errors(data, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_config(base={"output_dir": "x", "data": data})


def test_two_tasks_report_per_task_retention_that_adds_up(tiny, tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", make_rows(40, 11))
    ex = write_jsonl(tmp_path / "ex.jsonl", make_rows(24, 12))
    ex_eval = write_jsonl(tmp_path / "ex_eval.jsonl", make_rows(6, 13))
    out = tmp_path / "run"
    cfg = base_config(tiny, out, eval=QUIET, train={"max_steps": 3})
    cfg["data"] = {"tasks": [{"name": "qa", "train": str(qa), "weight": 1.0},
                             {"name": "extract", "train": str(ex), "eval": str(ex_eval), "weight": 3.0}],
                   "max_length": 64, "max_eval_rows": 5}
    rep = run(load_config(base=cfg), progress=False)
    tasks = rep["tasks"]
    assert set(tasks) == {"qa", "extract"}
    for v in tasks.values():
        assert {"perplexity", "accuracy", "kl_to_teacher"} <= set(v["student"]) and "perplexity" in v["retention"]
    assert rep["eval_rows"] == 4 + 5  # qa: a 10% split of 40; extract: its eval file, capped at max_eval_rows
    assert rep["data_mixture"]["extract"]["used"] == 3 * rep["data_mixture"]["qa"]["used"]
    # overall accuracy is the row-weighted mean of the tasks' (4 and 5 held-out rows)
    acc = (4 * tasks["qa"]["student"]["accuracy"] + 5 * tasks["extract"]["student"]["accuracy"]) / 9
    assert rep["student"]["metrics"]["accuracy"] == pytest.approx(acc, abs=1e-6)
    md = (out / "report.md").read_text()
    assert "## Per task" in md and "| extract | perplexity |" in md


def test_aggregate_equals_measuring_all_rows_at_once(tiny):
    """by_task's exact aggregation: the same figures as one pass over every held-out row."""
    from kdistill.data import Renderer, encode_examples, parse_row
    from kdistill.evaluate import by_task, logit_metrics
    from kdistill.models import load_model

    teacher, tok = load_model(str(tiny / "teacher"))
    student, _ = load_model(str(tiny / "student"))
    rows = tag_task([parse_row(r, "x") for r in make_rows(7, 21)], "a") + \
        tag_task([parse_row(r, "y") for r in make_rows(5, 22)], "b")
    feats, _ = encode_examples(Renderer(tok, 64), rows)

    def measure(rs, fs):
        return {"metrics": logit_metrics(student, fs, tok.pad_token_id, len(tok), teacher=teacher), "outputs": []}

    split = by_task(rows, feats, measure)
    whole = measure(rows, feats)["metrics"]
    assert set(split["tasks"]) == {"a", "b"}
    for k in ("perplexity", "kl_to_teacher", "top1_agreement"):
        assert split["metrics"][k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k  # (rounded to 6 places)


def test_cache_teacher_covers_every_task(tiny, tmp_path):
    from kdistill.commands.cache_teacher import cache_teacher
    from kdistill.topk_cache import TopKCache

    qa = write_jsonl(tmp_path / "qa.jsonl", make_rows(12, 31))
    ex = write_jsonl(tmp_path / "ex.jsonl", make_rows(8, 32))
    cfg = base_config(tiny, tmp_path / "o", cache={"path": str(tmp_path / "cache"), "top_k": 8})
    cfg["data"] = {"tasks": [{"name": "qa", "train": str(qa)}, {"name": "ex", "train": str(ex)}], "max_length": 64}
    cache_teacher(load_config(base=cfg), say=lambda _: None, progress=False)
    ids = set(TopKCache(tmp_path / "cache").index())
    assert any(i.startswith("qa/") for i in ids) and any(i.startswith("ex/") for i in ids)
    assert json.loads((tmp_path / "cache" / "teacher_eval.json").read_text())["rows"] > 0


def test_sequence_method_reports_per_task(tiny, tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", make_rows(30, 41))
    ex = write_jsonl(tmp_path / "ex.jsonl", make_rows(30, 42))
    cfg = base_config(tiny, tmp_path / "seq", method="sequence", eval=QUIET, train={"max_steps": 2},
                      student={"model": str(tiny / "student"), "init": None})
    cfg["data"] = {"tasks": [{"name": "qa", "train": str(qa)}, {"name": "ex", "train": str(ex)}], "max_length": 64}
    rep = run(load_config(base=cfg), progress=False)
    assert set(rep["tasks"]) == {"qa", "ex"}
    assert all("accuracy" in v["student"] and "perplexity" in v["retention"] for v in rep["tasks"].values())


def test_api_teacher_accuracy_is_split_per_task(tiny, tmp_path, monkeypatch):
    """With an API teacher and several tasks, the teacher's accuracy is measured per task (from its
    answers), so each task has its own retention; the overall figure weighs the tasks by their rows."""
    import re

    from fake_openai import FakeOpenAI

    monkeypatch.setenv("KD_TASK_KEY", "sk-task")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    qa_eval, ex_eval = make_rows(4, 51), make_rows(6, 52)
    for r in ex_eval:
        r["prompt"] = "extract: " + r["prompt"]

    def respond(msgs):  # right on every qa row, right on only the first two extract rows
        text = msgs[-1]["content"]
        m = re.search(r"first name (\w+) (\w+)", text)
        if text.startswith("extract:") and text not in {r["prompt"] for r in ex_eval[:2]}:
            return "no idea"
        return f"{m.group(1)} {m.group(2)}"

    srv = FakeOpenAI(model="big", key="sk-task").start()
    srv.responder = respond
    cfg = base_config(tiny, tmp_path / "run", method="sequence", eval=QUIET, train={"max_steps": 2},
                      student={"model": str(tiny / "student"), "init": None})
    cfg["teacher"] = {"api": {"base_url": srv.base_url, "model": "big", "api_key_env": "KD_TASK_KEY",
                              "max_retries": 0, "timeout": 30}}
    cfg["data"] = {"tasks": [{"name": "qa", "train": str(write_jsonl(tmp_path / "qa.jsonl", make_rows(20, 53))),
                              "eval": str(write_jsonl(tmp_path / "qa_eval.jsonl", qa_eval))},
                             {"name": "ex", "train": str(write_jsonl(tmp_path / "ex.jsonl", make_rows(20, 54))),
                              "eval": str(write_jsonl(tmp_path / "ex_eval.jsonl", ex_eval))}], "max_length": 64}
    try:
        rep = run(load_config(base=cfg), progress=False)
    finally:
        srv.stop()
    assert rep["tasks"]["qa"]["teacher"] == {"accuracy": 1.0}
    assert rep["tasks"]["ex"]["teacher"]["accuracy"] == pytest.approx(2 / 6, abs=1e-6)
    assert rep["teacher"]["metrics"]["accuracy"] == pytest.approx((4 + 2) / 10, abs=1e-6)
    for name, v in rep["tasks"].items():
        want = v["student"]["accuracy"] / v["teacher"]["accuracy"]
        assert v["retention"]["accuracy"] == pytest.approx(want, abs=1e-4), name
    assert rep["retention"]["kl_to_teacher"] is None and "kl_to_teacher" in rep["unavailable"]
