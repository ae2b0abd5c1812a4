"""method: sequence (sequence-level KD) and the filters, end to end on tiny models."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import base_config, make_rows, write_jsonl
from fake_openai import FakeOpenAI
from kdistill.cli import main
from kdistill.config import FiltersConfig, JudgeConfig, load_config
from kdistill.data import Example
from kdistill.errors import ConfigError
from kdistill.filters import apply_filters
from kdistill.scoring import parse_score
from kdistill.run import run

KEY = "sk-seq-HIDDEN-31337"


def ex(i, response, prompt=None, reference=None, **extra) -> Example:
    return Example(id=f"e{i}", messages=[{"role": "user", "content": prompt or f"prompt {i}"}], response=response,
                   reference=reference, extra=extra)


def test_every_filter_is_counted():
    rows = [
        ex(0, "a good answer"),
        ex(1, "   "),                                          # empty
        ex(2, "cut off mid", finish_reason="length"),           # truncated
        ex(3, "x"),                                            # length (min_chars 3)
        ex(4, "I'm sorry, but I cannot help with that."),      # refusal
        ex(5, "no digits here"),                               # format (regex \d)
        ex(6, "answer 7", reference="8"),                      # reference disagrees
        ex(7, "answer 7", reference="7"),                      # agrees
        ex(0, "a good answer").__class__(id="dup", messages=[{"role": "user", "content": "prompt 0"}],
                                         response="A good  answer"),  # duplicate of row 0 (normalized)
        ex(9, "Rationale: hm", sampling={"style": "rationale"}, answer=None),  # rationale without an answer: format
        ex(10, "fine 1 but judged low"),                       # judge < threshold
        ex(11, "fine 2 judged unparsable"),                    # judge_error
    ]
    rows[0].response = "a good answer 1"
    rows[8].response = "A good  answer 1"
    fc = FiltersConfig(min_chars=3, format_regex=r"\d|Rationale", reference="contains", judge=JudgeConfig(threshold=5))
    asked = []

    def judge(prompts):
        asked.extend(prompts)
        return ["Score: 2" if "judged low" in p else ("no idea" if "unparsable" in p else "Score: 9/10") for p in prompts]

    kept, rep = apply_filters(rows, fc, judge)
    assert [e.id for e in kept] == ["e0", "e7"]
    assert rep["dropped"] == {"empty": 1, "truncated": 1, "length": 1, "refusal": 1, "format": 2, "reference": 1,
                              "duplicate": 1, "judge": 1, "judge_error": 1}
    assert rep["total"] == 12 and rep["kept"] == 2
    assert len(asked) == 4  # only rows that passed everything else are judged
    assert parse_score("**Score:** 7.5") == 7.5


def test_filters_json_format_and_disabled():
    rows = [ex(0, '{"a": 1}'), ex(1, "```json\n[1, 2]\n```"), ex(2, "not json")]
    kept, rep = apply_filters(rows, FiltersConfig(format_json=True))
    assert [e.id for e in kept] == ["e0", "e1"] and rep["dropped"]["format"] == 1
    kept, rep = apply_filters(rows, FiltersConfig(enabled=False))
    assert len(kept) == 3 and rep["dropped"] == {}


def test_sequence_local_teacher_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny, out, method="sequence", train={"max_steps": 8}, eval={"speed_prompts": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "sequence" and rep["teacher"]["kind"] == "local"
    f = rep["filters"]
    assert f["total"] == 64 and f["kept"] + sum(f["dropped"].values()) == 64 and f["dropped"]["duplicate"] == 4
    assert set(rep["filters"]["dropped"]) >= {"empty", "truncated", "refusal", "duplicate"}
    # same tokenizer: every metric is measured, KL included
    assert rep["unavailable"] == {} and rep["retention"]["kl_to_teacher"] is not None
    assert rep["student"]["metrics"]["perplexity"] < rep["student_initial"]["metrics"]["perplexity"]
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert (out / "student" / "model.safetensors").exists() and "filters" in (out / "report.md").read_text()


def test_sequence_api_teacher_other_tokenizer_generate_filters_judge(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_SEQ_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")

    def respond(msgs):
        text = msgs[-1]["content"]
        if "impartial judge" in text:
            return "Score: 2" if "zulu" in text.split("[Response]")[1] else "Score: 9"
        m = re.search(r"first name (\w+) (\w+)", text)
        return f"{m.group(1)} {m.group(1)} {m.group(2)}" if m else "?"

    srv = FakeOpenAI(model="big", key=KEY).start()
    srv.responder = respond
    train = make_rows(24, 5)
    srv.plan = {train[0]["prompt"]: ["length"], train[1]["prompt"]: ["500"]}
    write_jsonl(tmp_path / "prompts.jsonl", [{k: r[k] for k in ("id", "prompt", "reference")} for r in train])
    out = tmp_path / "run"
    cfg = base_config(tiny, out, method="sequence", train={"max_steps": 3}, eval={"speed_prompts": 0})
    cfg["teacher"] = {"api": {"base_url": srv.base_url, "model": "big", "api_key_env": "KD_SEQ_KEY", "max_concurrency": 4,
                              "timeout": 30, "max_retries": 2, "backoff_base": 0.01}}
    cfg["student"] = {"model": str(tiny / "other_student")}  # a different tokenizer: fine for sequence KD
    cfg["data"] = {"eval": str(tiny / "eval.jsonl"), "max_length": 64}
    cfg["generate"] = {"prompts": str(tmp_path / "prompts.jsonl"), "temperature": 0.0, "max_new_tokens": 16}
    cfg["filters"] = {"reference": "contains", "judge": {"threshold": 5}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    try:
        assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
        n_requests = len(srv.requests)
        rep = json.loads((out / "report.json").read_text())
        assert rep["generation"]["succeeded"] == 24 and rep["generation"]["retried"] == 1
        written = [json.loads(l) for l in (out / "teacher.jsonl").read_text().splitlines()]
        survivors = {(r["prompt"], r["response"]) for r in written if r["finish_reason"] != "length"}
        zulu = sum("zulu" in resp for _, resp in survivors)
        assert zulu > 0 and rep["filters"]["dropped"]["judge"] == zulu  # the judge's low scores dropped exactly these
        assert rep["filters"]["dropped"]["truncated"] == 1
        assert rep["filters"]["kept"] + sum(rep["filters"]["dropped"].values()) == rep["filters"]["total"]
        # only the API teacher: task accuracy is measured through its answers; the rest is marked unavailable
        assert rep["teacher"]["kind"] == "api" and rep["teacher"]["metrics"]["accuracy"] == 1.0
        assert set(rep["unavailable"]) == {"perplexity", "kl_to_teacher", "top1_agreement"}
        assert rep["retention"]["accuracy"] is not None and rep["retention"]["kl_to_teacher"] is None
        assert "not measured" in (out / "report.md").read_text()
        # a rerun pays for nothing again: generation, judge scores and teacher eval answers are on disk
        (out / "report.json").unlink()
        assert main(["run", str(tmp_path / "c.yaml"), "--no-progress", "--set", "train.max_steps=4",
                     "--set", "train.resume=accept_changes"]) == 0
        assert len(srv.requests) == n_requests
    finally:
        srv.stop()
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p


def test_rationale_rows_train_as_two_tasks_without_a_teacher(tiny, tmp_path):
    rows = []
    for r in make_rows(24, 7):
        a = r["reference"]
        rows.append({**r, "response": f"Rationale: the name comes first.\nAnswer: {a}",
                     "rationale": "the name comes first.", "answer": a, "sampling": {"style": "rationale"}})
    write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    # shuffled batches mix both views in every step (length-grouped ones would put the short answer
    # views and the long rationale views in different micro-batches)
    cfg = base_config(tiny, out, method="sequence", train={"max_steps": 4, "batch_size": 8, "batching": "shuffle"},
                      eval={"speed_prompts": 0})
    cfg["teacher"] = {}
    cfg["student"] = {"model": str(tiny / "student")}
    cfg["data"] = {"train": str(tmp_path / "train.jsonl"), "eval": str(tiny / "eval.jsonl"), "max_length": 64}
    cfg["sequence"] = {"rationale_weight": 0.5}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method_summary"]["views"] == {"answer": 24, "rationale": 24}
    assert rep["method_summary"]["tasks"]["rationale_weight"] == 0.5
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("ce_answer" in r and "ce_rationale" in r for r in logged)
    assert set(rep["unavailable"]) == {"accuracy", "perplexity", "kl_to_teacher", "top1_agreement"}
    assert rep["teacher"]["kind"] == "none" and "accuracy" in rep["student"]["metrics"]


def test_student_cut_needs_a_local_teacher(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path / "run", method="sequence")
    cfg["teacher"] = {"api": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2


def test_examples_are_valid_configs():
    from pathlib import Path

    from kdistill.config import load_config

    root = Path(__file__).resolve().parents[1] / "examples"
    gen = load_config(str(root / "generate.yaml"))
    assert gen.student is None and gen.teacher.api.api_key_env == "OPENAI_API_KEY"
    seq = load_config(str(root / "sequence_api.yaml"))
    assert seq.method == "sequence" and seq.generate.style == "rationale" and seq.filters.reference == "contains"


def test_eval_only_without_a_teacher(tiny, tmp_path):
    out = tmp_path / "ev"
    cfg = base_config(tiny, out, method="sequence", eval={"speed_prompts": 0})
    cfg["teacher"] = {}
    cfg["student"] = {"model": str(tiny / "student")}
    cfg["data"] = {"eval": str(tiny / "eval.jsonl"), "max_length": 64}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "c.yaml")]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert "perplexity" in rep["student"]["metrics"] and rep["teacher"]["params"] is None
    assert "not measured" in (out / "report.md").read_text()


def test_local_teacher_generates_at_run_time_for_a_student_with_another_tokenizer(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny, out, method="sequence", train={"max_steps": 2}, eval={"speed_prompts": 0, "generate": False})
    cfg["student"] = {"model": str(tiny / "other_student")}
    write_jsonl(tmp_path / "train.jsonl", make_rows(20, 3))
    cfg["data"] = {"train": str(tmp_path / "train.jsonl"), "eval": str(tiny / "eval.jsonl"), "max_length": 64}
    cfg["generate"] = {"max_new_tokens": 6, "temperature": 0.0, "batch_size": 10}  # prompts: data.train's
    cfg["filters"] = {"truncated": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["generation"]["total"] == 20 and rep["generation"]["complete"]
    written = [json.loads(l) for l in (out / "teacher.jsonl").read_text().splitlines()]
    assert all(r["teacher"] == str(tiny / "teacher") and r["finish_reason"] in ("stop", "length") for r in written)
    # a local teacher with another tokenizer: its own perplexity and accuracy, no token-level comparison
    assert "perplexity" in rep["teacher"]["metrics"] and "perplexity" in rep["student"]["metrics"]
    assert set(rep["unavailable"]) == {"kl_to_teacher", "top1_agreement", "perplexity"}
    assert rep["retention"]["perplexity"] is None


def test_sequence_method_takes_a_length_curriculum(tiny, tmp_path):
    from conftest import base_config
    from kdistill.config import load_config
    from kdistill.run import run

    cfg = base_config(tiny, tmp_path / "seq", method="sequence", student={"model": str(tiny / "other_student"), "init": None},
                      train={"max_steps": 3}, eval={"generate": False, "speed_prompts": 0},
                      curriculum={"by": "length", "start": 0.5, "steps": 1.0})
    rep = run(load_config(base=cfg), say=lambda _: None, progress=False)
    assert rep["training"]["curriculum"]["by"] == "length" and rep["training"]["steps"] == 3


def test_sequence_selects_the_best_student(tiny, tmp_path):
    """eval.every / eval.select_best work for method sequence as for logit: the reported and saved
    student is the best evaluated one, not simply the last."""
    out = tmp_path / "run"
    cfg = base_config(tiny, out, method="sequence", train={"max_steps": 6, "learning_rate": 0.3,
                                                            "lr_scheduler": "constant"},
                      eval={"generate": False, "speed_prompts": 0, "every": 2, "select_best": "perplexity"},
                      data={"max_eval_rows": 4})
    rep = run(load_config(base=cfg), progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_perplexity"] for r in rows if "eval_perplexity" in r}
    assert sorted(evals) == [2, 4, 6]
    best_step = min(evals, key=evals.get)
    assert rep["training"]["selected"]["step"] == best_step
    assert rep["student"]["metrics"]["perplexity"] == pytest.approx(evals[best_step], rel=1e-5)
    assert (out / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["zephyr", "self_distill", "progressive"])
def test_periodic_eval_is_refused_for_multi_pass_methods(method):
    with pytest.raises(ConfigError, match="eval.every: applies to the single-pass methods"):
        load_config(base={"output_dir": "x", "method": method, "eval": {"every": 5},
                          "progressive": {"layers": [2]}})
