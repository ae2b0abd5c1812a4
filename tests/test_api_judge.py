"""A text-only API teacher for zephyr and the judge-scored rounds: answers and ratings over HTTP."""

from __future__ import annotations

import json
import re

import pytest

from conftest import base_config
from fake_openai import serve
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.run import run

KEY = "sk-judge-5551"


@pytest.fixture()
def server(monkeypatch):
    yield from serve(monkeypatch, KEY, "KD_JUDGE_KEY")


def _responder(msgs):
    text = msgs[-1]["content"]
    if "How good is this answer" in text:  # the rating prompt: longer answers rate higher, 1..5
        answer = re.search(r"Answer: (.*)\n\nHow good", text, re.S).group(1)
        return f"Score: {1 + min(4, len(answer.split()))}"
    words = text.split()
    return f"{words[-2]} {words[-2]}"  # the dSFT answer: the first name, twice


def _cfg(tiny, server, out, **sections):
    cfg = base_config(tiny, out, student={"model": str(tiny / "student"), "init": None},
                      eval={"speed_prompts": 0, "max_new_tokens": 4}, data={"max_eval_rows": 4},
                      train={"max_steps": 2, "batch_size": 4}, **sections)
    cfg["teacher"] = {"api": {"base_url": server.base_url, "model": "teacher-x", "api_key_env": "KD_JUDGE_KEY",
                              "max_retries": 1, "backoff_base": 0.01, "backoff_max": 0.02}}
    return cfg


def test_zephyr_with_an_api_teacher(tiny, server, tmp_path):
    server.responder = _responder
    out = tmp_path / "z"
    cfg = _cfg(tiny, server, out, method="zephyr",
               zephyr={"max_new_tokens": 4, "candidates": 3, "feedback_prompts": 6, "win_rate_prompts": 2,
                       "sft_max_steps": 2},
               dpo={"max_steps": 1})
    rep = run(load_config(base=cfg), progress=False)
    sft = [json.loads(l) for l in (out / "zephyr" / "1-sft" / "teacher.jsonl").read_text().splitlines()]
    assert len(sft) == 64 and all(r["teacher"].startswith("api:teacher-x") for r in sft)
    cands = [json.loads(l) for l in (out / "zephyr" / "2-feedback" / "candidates.jsonl").read_text().splitlines()]
    scores = {c["score"] for r in cands for c in r["candidates"]}
    assert scores <= {1.0, 2.0, 3.0, 4.0, 5.0}  # the API judge's integer ratings
    s = rep["method_summary"]
    assert s["api_teacher"]["ratings"] >= 6 * 3 and s["win_rate_vs_dsft"] is not None
    assert "accuracy" in rep["teacher"]["metrics"] and "perplexity" in rep["unavailable"]
    assert rep["teacher"]["name"].startswith("api:teacher-x")
    judged = [r for r in server.requests if "How good is this answer" in json.dumps(r)]
    assert judged  # the ratings really came over HTTP


def test_self_distill_judged_by_an_api_teacher(tiny, server, tmp_path):
    server.responder = _responder
    out = tmp_path / "sd"
    rep = run(load_config(base=_cfg(tiny, server, out, method="self_distill",
                                    self_distill={"iterations": 1, "n": 2, "max_new_tokens": 4, "scorer": "judge",
                                                  "prompts_per_round": 4})), progress=False)
    assert rep["method_summary"]["api_judge"]["ratings"] == 8
    kept = [json.loads(l) for l in (out / "self_distill" / "round-1" / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 4 and all(k["score"] >= 1.0 for k in kept)


def test_api_teacher_cannot_give_logits(tiny, server, tmp_path):
    with pytest.raises(ConfigError, match="teacher.api: method logit needs the teacher's token distributions"):
        run(load_config(base=_cfg(tiny, server, tmp_path / "l")), progress=False)
    with pytest.raises(ConfigError, match="zephyr.scorer: loglik needs the teacher's token probabilities"):
        run(load_config(base=_cfg(tiny, server, tmp_path / "z", method="zephyr", zephyr={"scorer": "loglik"})),
            progress=False)


def test_eval_with_an_api_teacher(tiny, server, tmp_path, capsys):
    """`kdistill eval` for a method with a text-only teacher: its accuracy from its answers, the rest
    listed as unavailable (no traceback, no cache message)."""
    import yaml

    from kdistill.cli import main

    server.responder = _responder
    cfg = _cfg(tiny, server, tmp_path / "e", method="self_distill", self_distill={"scorer": "judge"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "c.yaml")]) == 0
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    assert "accuracy" in rep["teacher"]["metrics"] and "perplexity" in rep["unavailable"]
    assert "cache" not in capsys.readouterr().err
