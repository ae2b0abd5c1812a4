"""method: zephyr — dSFT, AI feedback, dDPO; every stage resumes after an interruption."""

import json

import pytest

import kdistill.methods.zephyr as zephyr_mod
from conftest import base_config
from kdistill.config import load_config
from kdistill.methods.base import Method
from kdistill.methods.dpo import DPOMethod
from kdistill.run import run


class Interrupted(Exception):
    pass


def crash_on_call(n, fn):
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise Interrupted(f"simulated crash at call {n}")
        return fn(*a, **k)

    return wrapped, calls


def read(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_zephyr_runs_all_stages_and_each_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "z"
    cfg = base_config(tiny, out, method="zephyr",
                      train={"max_steps": 4, "save_every": 2, "batch_size": 8, "learning_rate": 5e-3},
                      zephyr={"max_new_tokens": 6, "candidates": 3, "feedback_prompts": 16, "win_rate_prompts": 4,
                              "other_models": [str(tiny / "other_student")]},
                      dpo={"beta": 0.5, "max_steps": 4})
    cfg["eval"] = {**cfg["eval"], "generate": False, "speed_prompts": 0}
    cfg["data"] = {**cfg["data"], "max_eval_rows": 4}
    config = load_config(base=cfg)
    root = out / "zephyr"

    # 1. crash in dSFT training after the step-2 checkpoint
    crash, _ = crash_on_call(3, Method.loss)
    monkeypatch.setattr(Method, "loss", crash)
    with pytest.raises(Interrupted):
        run(config, progress=False)
    monkeypatch.undo()
    assert (root / "1-sft" / "checkpoints" / "step-2").is_dir() and not (root / "1-sft" / "done.json").exists()
    assert len(read(root / "1-sft" / "teacher.jsonl")) == 64  # every training prompt answered once

    # 2. dSFT resumes at step 2 and finishes; AI feedback crashes after its first batch of 8 prompts
    crash, _ = crash_on_call(2, zephyr_mod.score_candidates)
    monkeypatch.setattr(zephyr_mod, "score_candidates", crash)
    with pytest.raises(Interrupted):
        run(config, progress=False)
    monkeypatch.undo()
    sft = json.loads((root / "1-sft" / "done.json").read_text())
    assert sft["resumed_from"] == 2 and sft["steps"] == 4
    assert len(read(root / "2-feedback" / "candidates.jsonl")) == 8 and not (root / "2-feedback" / "done.json").exists()

    # 3. dSFT is skipped, feedback rates only the 8 prompts left, dDPO crashes after its step-2 checkpoint
    scorer, calls = crash_on_call(0, zephyr_mod.score_candidates)
    monkeypatch.setattr(zephyr_mod, "score_candidates", scorer)
    crash, _ = crash_on_call(3, DPOMethod.loss)
    monkeypatch.setattr(DPOMethod, "loss", crash)
    with pytest.raises(Interrupted):
        run(config, progress=False)
    monkeypatch.undo()
    assert calls["n"] == 1
    cands = read(root / "2-feedback" / "candidates.jsonl")
    assert len(cands) == 16 and len({c["id"] for c in cands}) == 16
    assert all(len(c["candidates"]) == 4 and c["candidates"][-1]["source"].endswith("other_student") for c in cands)
    pairs = read(root / "2-feedback" / "pairs.jsonl")
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert (root / "3-dpo" / "checkpoints" / "step-2").is_dir()

    # 4. everything finished before is skipped; dDPO resumes at step 2; the report has every stage
    rep = run(config, progress=False)
    s = rep["method_summary"]
    st = s["stages"]
    assert st["sft"].pop("finished_earlier") is True and st["sft"] == sft and st["feedback"]["pairs"] == len(pairs)
    assert st["dpo"]["resumed_from"] == 2 and st["dpo"]["steps"] == 4 and st["dpo"]["pairs"] == len(pairs)
    # DPO raised the chosen-over-rejected margin on its training pairs
    assert st["dpo"]["after"]["logp_margin"] > st["dpo"]["before"]["logp_margin"]
    assert st["dpo"]["after"]["reward_margin"] > 0 and s["dpo_reward_accuracy"] > 0.5
    wr = st["win_rate_vs_dsft"]
    assert wr["prompts"] == 4 and wr["wins"] + wr["ties"] + wr["losses"] == 4 and 0.0 <= s["win_rate_vs_dsft"] <= 1.0
    assert 1.0 <= wr["mean_score_final"] <= 5.0  # the judge's expected rating on a 1-5 scale
    assert "kl_to_teacher" in st["sft"]["heldout"] and "kl_to_teacher" in st["dpo"]["heldout"]
    assert rep["training"]["steps"] == 8 and "retention" in rep
    assert (out / "student" / "model.safetensors").is_file() and "win_rate_vs_dsft" in (out / "report.md").read_text()
    steps = read(out / "metrics.jsonl")  # both training passes, one step axis, for the loss plot
    assert [r["step"] for r in steps] == list(range(1, 9)) and {r["stage"] for r in steps} == {"dsft", "ddpo"}
    assert "loss.png" in rep["plots"]


def test_judge_score_is_the_expected_rating(tiny):
    import torch

    from kdistill.data import Example, Renderer
    from kdistill.scoring import DEFAULT_JUDGE_TEMPLATE, judge_scores, rating_token_ids
    from kdistill.models import load_model

    teacher, tok = load_model(str(tiny / "teacher"))
    renderer = Renderer(tok, 512)
    prompts, answers = ["what is the first name alpha beta", "what is the first name kilo lima"], ["alpha", "zulu zulu"]
    got = judge_scores(teacher, tok, renderer, prompts, answers, DEFAULT_JUDGE_TEMPLATE, scale=5)
    ids = rating_token_ids(tok, 5)
    for p, a, g in zip(prompts, answers, got):  # one at a time, no padding, by hand
        text = DEFAULT_JUDGE_TEMPLATE.format(prompt=p, answer=a, scale=5)
        x = torch.tensor([renderer.prompt_ids(Example(id="", messages=[{"role": "user", "content": text}], response=None))])
        with torch.no_grad():
            probs = torch.softmax(teacher(input_ids=x).logits[0, -1, ids].float(), -1)
        assert g == pytest.approx(float((probs * torch.arange(1, 6)).sum()), abs=1e-5)
