"""A new method or teacher kind is one module plus its registration: no edit in the run or the config core.

Both are written here, in the test file, registered, and run end to end through ``kdistill run``.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from pydantic import Field

from conftest import base_config
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import IGNORE_INDEX
from kdistill.errors import ConfigError
from kdistill.methods import Method, register, unregister
from kdistill.settings import Section
from kdistill.teachers import Teacher, TeacherSignal, register_teacher, unregister_teacher


class ToyConfig(Section):
    """``method: toy_mse`` — match the teacher's logits with a mean squared error, times ``scale``."""

    scale: float = Field(1.0, gt=0.0)


class ToyMSE(Method):
    """A method in a dozen lines: it declares what it needs and computes its loss."""

    name = "toy_mse"
    sections = {"toy_mse": ToyConfig}

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        return frozenset({"distribution"})

    def loss(self, model, batch, num_items):
        V = self.ctx.vocab_size
        s = model(batch["input_ids"], batch["attention_mask"])[..., :V].float()
        t = self.ctx.teacher.signal(batch, hidden=False).logits.float()
        keep = batch["labels"] != IGNORE_INDEX
        per_token = ((s - t) ** 2).mean(-1)[keep]
        return self.ctx.cfg.toy_mse.scale * per_token.sum() / num_items, {"mse": float(per_token.mean().detach())}

    def summary(self) -> dict:
        return {"toy": "mean squared logit error", "scale": self.ctx.cfg.toy_mse.scale}


class LabelOracle(Teacher):
    """A teacher kind in a dozen lines: logits that put ``margin`` nats on each position's label."""

    name_of_kind = "label_oracle"
    kind = "oracle"
    offers = frozenset({"distribution", "any_sequence"})
    what = "a label oracle"

    @classmethod
    def build(cls, spec, key, env):
        t = cls()
        t.vocab, t.margin, t.key, t.name = env.vocab_size, float(spec.options.get("margin", 5.0)), key, "label oracle"
        return t

    def signal(self, batch, hidden=True, feature_layers=None):
        labels = batch["labels"]
        logits = torch.zeros(*labels.shape, self.vocab, device=labels.device)
        logits.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), self.margin)
        return TeacherSignal(logits=logits)


@pytest.fixture()
def toy_method():
    register(ToyMSE)
    yield ToyMSE
    unregister("toy_mse")


@pytest.fixture()
def oracle_kind():
    register_teacher(LabelOracle)
    yield LabelOracle
    unregister_teacher(LabelOracle)


def _run(tmp_path, cfg: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path), "--no-progress"])
    return code, capsys.readouterr().err


def test_a_method_registered_from_outside_runs_end_to_end(tiny, tmp_path, toy_method, capsys):
    out = tmp_path / "toy"
    cfg = base_config(tiny, out, method="toy_mse", toy_mse={"scale": 0.5},
                      train={"max_steps": 4, "batching": "shuffle"},  # first vs last batch: rows of mixed lengths
                      eval={"generate": False, "speed_prompts": 0})
    code, err = _run(tmp_path, cfg, capsys)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "toy_mse" and rep["method_summary"] == {"toy": "mean squared logit error", "scale": 0.5}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["mse"] < rows[0]["mse"]  # its loss trained the student
    assert rep["student"]["metrics"]["kl_to_teacher"] < rep["student_initial"]["metrics"]["kl_to_teacher"]
    assert (out / "student" / "model.safetensors").exists()
    # its section is part of the schema: validated, with the usual did-you-mean
    with pytest.raises(ConfigError, match="toy_mse.scle: unknown key; did you mean 'scale'"):
        load_config(base=dict(cfg, toy_mse={"scle": 2}))
    with pytest.raises(ConfigError, match="toy_mse.scale"):
        load_config(base=dict(cfg, toy_mse={"scale": -1}))


def test_an_unregistered_method_is_unknown_again(tiny, tmp_path):
    register(ToyMSE)
    assert load_config(base=base_config(tiny, tmp_path, method="toy_mse")).method == "toy_mse"
    unregister("toy_mse")
    with pytest.raises(ConfigError, match="unknown method 'toy_mse'"):
        load_config(base=base_config(tiny, tmp_path, method="toy_mse"))


def test_a_teacher_kind_registered_from_outside_teaches(tiny, tmp_path, oracle_kind, capsys):
    out = tmp_path / "oracle"
    cfg = base_config(tiny, out, teacher={"model": None, "kind": "label_oracle", "options": {"margin": 8.0}},
                      student={"model": str(tiny / "student"), "init": None}, train={"max_steps": 4},
                      eval={"generate": False, "speed_prompts": 0})
    code, err = _run(tmp_path, cfg, capsys)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher"]["kind"] == "oracle" and rep["teacher"]["name"] == "label oracle"
    loss = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert loss[-1] < loss[0]
    # what the kind does not offer is refused with its own one line
    code, err = _run(tmp_path, dict(cfg, output_dir=str(tmp_path / "f"), features={"weight": 1.0}), capsys)
    assert code == 2 and "feature distillation needs one live teacher model (teacher.model), not a label oracle" in err
