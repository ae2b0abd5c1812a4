"""Several teachers: mixture in probability space, sum of divergences, tokenizer check (issue 5)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import base_config
from test_cache import tiny_cache  # noqa: F401  (fixture)
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.losses import TopK, distill_loss
from kdistill.methods.base import RunContext
from kdistill.methods.logit import LogitMethod
from kdistill.teachers.base import Teacher, TeacherSignal
from kdistill.teachers.multi import MultiTeacher, mix_logprobs, mix_topk


def test_mix_logprobs_hand_computed():
    a = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    b = torch.log(torch.tensor([[0.1, 0.1, 0.8]]))
    got = mix_logprobs([a, b], [1.0, 3.0]).exp()  # weights normalized: 0.25, 0.75
    assert torch.allclose(got, torch.tensor([[0.25, 0.125, 0.625]]), atol=1e-6)


def test_mix_topk_union_hand_computed():
    # teacher A: top-2 {0: .5, 1: .3}, tail .2; teacher B: top-2 {1: .6, 2: .1}, tail .3; weights 1:1
    a = TopK(torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.3]])))
    b = TopK(torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.6, 0.1]])))
    got = mix_topk([a, b], [1.0, 1.0])  # union {0: .25, 1: .45, 2: .05}; keep 2
    assert got.indices.tolist() == [[1, 0]]
    assert torch.allclose(got.logprobs.exp(), torch.tensor([[0.45, 0.25]]), atol=1e-6)
    full = mix_topk([a, b], [1.0, 1.0], k=3)  # at most the larger k
    assert full.indices.shape[-1] == 2
    # the ids of a row are distinct even when the teachers agree entirely
    same = mix_topk([a, a], [2.0, 1.0])
    assert same.indices.tolist() == [[0, 1]] and torch.allclose(same.logprobs, a.logprobs, atol=1e-6)


class _Fixed(Teacher):
    """A teacher that returns fixed logits."""

    can_fuse = False
    offers = frozenset({"distribution", "any_sequence"})

    def __init__(self, logits):
        self.logits = logits

    def signal(self, batch, hidden=True):
        return TeacherSignal(logits=self.logits)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_multi_teacher_loss_against_hand_computed_values():
    p1, p2, q = [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]
    t1 = torch.log(torch.tensor([[p1]]))  # [1, 1, 3]
    t2 = torch.log(torch.tensor([[p2]]))
    s = torch.log(torch.tensor([[q]]))
    labels = torch.tensor([[0]])
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1, dtype=torch.long),
             "labels": labels}
    # mixture: KL(0.25·P1 + 0.75·P2 ‖ Q)
    mixed = MultiTeacher([_Fixed(t1), _Fixed(t2)], [1.0, 3.0], "mixture").signal(batch)
    m = [0.25 * a + 0.75 * b for a, b in zip(p1, p2)]
    assert float(distill_loss(s, mixed.logits, labels)) == pytest.approx(_kl(m, q), rel=1e-5)

    # sum: 0.25·KL(P1‖Q) + 0.75·KL(P2‖Q), through the logit method's loss
    cfg = load_config(None, [], base={"output_dir": "x", "loss": {"alpha": 1.0, "fused": False, "teacher_mix": "sum"},
                                      "teacher": {"model": "x"}})

    class Student(torch.nn.Module):
        can_fuse = False

        def forward(self, ids, mask, hidden=False):
            return s

    for mode, want in (("sum", 0.25 * _kl(p1, q) + 0.75 * _kl(p2, q)), ("mixture", _kl(m, q))):
        teacher = MultiTeacher([_Fixed(t1), _Fixed(t2)], [1.0, 3.0], mode)
        method = LogitMethod(RunContext(cfg=cfg, tokenizer=None, teacher=teacher, vocab_size=3, output_dir="x"))
        loss, _ = method.loss(Student(), batch, 1)
        assert float(loss) == pytest.approx(want, rel=1e-5), mode


def test_teachers_must_share_the_tokenizer(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "run")
    cfg["teacher"] = {}
    cfg["teachers"] = [{"model": str(tiny / "teacher")}, {"model": str(tiny / "other_student")}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "differs from the student's" in err and "loss.cross_tokenizer" in err


def test_teacher_and_teachers_together_refused(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "run")
    cfg["teachers"] = [{"model": str(tiny / "teacher")}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    assert "set either teacher or teachers" in capsys.readouterr().err


@pytest.mark.parametrize("mix,second", [("mixture", "cache"), ("sum", "cache"), ("mixture", "live")])
def test_run_two_teachers(tiny, tiny_cache, tmp_path, mix, second):
    """A live teacher plus a cached one (top-k union mixture, or summed divergences), or plus a
    second live model (full-distribution mixture), end to end."""
    path, _ = tiny_cache
    out = tmp_path / "run"
    cfg = base_config(tiny, out, train={"max_steps": 2}, loss={"teacher_mix": mix},
                      eval={"generate": False, "speed_prompts": 0})
    cfg["teacher"] = {}
    other = {"cache": str(path)} if second == "cache" else {"model": str(tiny / "student")}
    cfg["teachers"] = [{"model": str(tiny / "teacher"), "weight": 2.0}, {**other, "weight": 1.0}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert "kl_to_teacher" in rep["student"]["metrics"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
