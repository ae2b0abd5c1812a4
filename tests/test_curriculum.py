"""Curriculum: easiest rows first, a growing pool, then shuffled epochs; resumable."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import Crash, base_config, crash_at_loss
from kdistill.config import CurriculumConfig, load_config
from kdistill.curriculum import schedule
from kdistill.run import run

QUIET = {"generate": False, "speed_prompts": 0}


def test_schedule_grows_the_pool_from_the_easiest_rows():
    scores = [float(i) for i in range(100)]  # row i has difficulty i
    cc = CurriculumConfig(by="length", start=0.2, steps=0.5)
    pick = schedule(cc, scores, batch_size=4, seed=0, total_steps=10, micro_per_step=2)
    assert all(max(pick(g)) < 20 for g in (0, 1))  # step 0: the easiest 20%
    assert max(max(pick(g)) for g in range(8, 10)) < 84  # step 4: 20% + 80% * 4/5
    assert pick(10) is None  # step 5 = 50% of 10 steps: ordinary epochs from here
    assert pick(3) == pick(3) and len(set(pick(3))) == 4  # seeded by the micro-batch index, no repeats
    sq = schedule(CurriculumConfig(by="length", start=0.2, steps=0.5, pacing="sqrt"), scores, 4, 0, 10, 2)
    pools = [max(max(sq(g)) for g in range(2 * s, 2 * s + 2)) for s in range(5)]
    assert max(max(pick(g)) for g in (2, 3)) < 36 and pools[1] >= 20  # sqrt opens the pool faster


def test_first_batches_are_the_shortest_rows(tiny, tmp_path, monkeypatch):
    from kdistill.methods import logit

    seen: list[list[str]] = []
    real = logit.LogitMethod.loss

    def spy(self, model, batch, num_items):
        seen.append(list(batch["ids"]))
        return real(self, model, batch, num_items)

    monkeypatch.setattr(logit.LogitMethod, "loss", spy)
    out = tmp_path / "run"
    rep = run(load_config(base=base_config(tiny, out, eval=QUIET, train={"max_steps": 4, "batch_size": 4},
                                           curriculum={"by": "length", "start": 0.25, "steps": 0.5})), progress=False)
    from kdistill.data import Renderer, load_examples
    from kdistill.models import load_tokenizer

    renderer = Renderer(load_tokenizer(str(tiny / "teacher")), 64)
    rows = load_examples(tiny / "train.jsonl")
    length = {e.id: sum(l != -100 for l in renderer.encode(e)["labels"]) for e in rows}
    cutoff = sorted(length.values())[len(rows) // 4]
    assert all(length[i] <= cutoff for i in seen[0])  # the first step only sees the easiest quarter
    assert rep["training"]["curriculum"]["by"] == "length" and rep["training"]["curriculum"]["steps"] == 2


def test_teacher_loss_curriculum_resumes_exactly_without_rescoring(tiny, tmp_path, monkeypatch):
    from kdistill import scoring as feedback

    common = dict(eval=QUIET, train={"max_steps": 6, "save_every": 3},
                  curriculum={"by": "teacher_loss", "start": 0.3, "steps": 0.7})
    clean = tmp_path / "clean"
    run(load_config(base=base_config(tiny, clean, **common)), progress=False)
    assert json.loads((clean / "curriculum.json").read_text())["by"] == "teacher_loss"

    crashed = tmp_path / "crashed"
    cfg = load_config(base=base_config(tiny, crashed, **common))
    crash_at_loss(monkeypatch, 5)
    with pytest.raises(Crash):
        run(cfg, progress=False)
    monkeypatch.undo()
    scored = {"n": 0}
    real_scores = feedback.loglik_scores

    def counting(*a, **k):
        scored["n"] += 1
        return real_scores(*a, **k)

    monkeypatch.setattr(feedback, "loglik_scores", counting)
    rep = run(cfg, progress=False)
    assert rep["training"]["resumed_from"] == 3 and scored["n"] == 0  # scores reused from curriculum.json
    a = [json.loads(l)["loss"] for l in (clean / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l)["loss"] for l in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    wa, wb = load_file(clean / "student" / "model.safetensors"), load_file(crashed / "student" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_teacher_loss_needs_a_live_teacher(tiny, tmp_path):
    from kdistill.curriculum import difficulty

    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="curriculum.by: teacher_loss needs a live teacher"):
        difficulty(CurriculumConfig(by="teacher_loss"), [{"id": "a", "labels": [1]}], tmp_path, teacher=None)


def test_curriculum_with_a_multi_pass_method_is_refused():
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="curriculum: applies to the single-pass methods"):
        load_config(base={"output_dir": "x", "method": "zephyr", "curriculum": {"by": "length"}})
