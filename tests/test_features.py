"""Feature (hidden-state) distillation: layer maps, adapters, the loss, and runs with it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import base_config, narrow_student
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.features import FeatureAdapters, feature_loss, layer_map
from kdistill.models import cut_student, load_model
from kdistill.run import run

QUIET = {"generate": False, "speed_prompts": 0}


def test_layer_map_auto_follows_the_cut_and_spreads_otherwise(tiny):
    teacher, _ = load_model(str(tiny / "teacher"))  # 4 blocks
    cut = cut_student(teacher, [0, 3])
    assert layer_map("auto", cut, teacher) == [(0, 0), (1, 3)]
    other, _ = load_model(str(tiny / "student"))  # 2 blocks, not cut from the teacher
    assert layer_map("auto", other, teacher) == [(0, 1), (1, 3)]
    assert layer_map([[1, 2]], other, teacher) == [(1, 2)]
    with pytest.raises(ValueError, match=r"features.layers: pair \[2, 0\] is out of range"):
        layer_map([[2, 0]], other, teacher)


def test_feature_loss_values_masking_and_adapters():
    torch.manual_seed(0)
    s = {0: torch.randn(2, 5, 8)}
    t = {1: torch.randn(2, 5, 8)}
    labels = torch.tensor([[-100, 4, 4, -100, -100], [3, -100, -100, -100, 2]])
    rows = labels != -100
    cos = 1 - torch.nn.functional.cosine_similarity(s[0][rows], t[1][rows], dim=-1)
    got = feature_loss(s, t, [(0, 1)], labels, num_items=10, kind="cosine")
    assert float(got) == pytest.approx(float(cos.sum() / 10), rel=1e-5)
    mse = feature_loss(s, t, [(0, 1)], labels, num_items=4, kind="mse", normalize=False)
    assert float(mse) == pytest.approx(float((s[0][rows] - t[1][rows]).pow(2).mean(-1).sum() / 4), rel=1e-5)
    # identical features: zero; scaled teacher: cosine and normalized mse still zero
    same = feature_loss(s, {1: 3.0 * s[0]}, [(0, 1)], labels, 4, kind="cosine")
    assert abs(float(same)) < 1e-6
    assert abs(float(feature_loss(s, {1: 3.0 * s[0]}, [(0, 1)], labels, 4, kind="mse"))) < 1e-5
    # widths differ: a trained adapter maps student width onto teacher width
    ad = FeatureAdapters([(0, 1)], 8, 12)
    wide = {1: torch.randn(2, 5, 12)}
    loss = feature_loss(s, wide, [(0, 1)], labels, 4, adapters=ad, kind="mse")
    loss.backward()
    assert ad.maps["0"].weight.grad is not None and ad.maps["0"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no adapter"):
        feature_loss(s, wide, [(0, 1)], labels, 4, kind="mse")


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fused", [True, False])
def test_feature_term_adds_to_the_logit_loss_and_falls(tiny, tmp_path, fused):
    # a student not cut from the teacher: its features start far from the teacher's
    common = dict(eval=QUIET, data={"max_eval_rows": 4}, loss={"fused": fused},
                  student={"model": str(tiny / "student"), "init": None}, train={"max_steps": 8})
    plain = run(load_config(base=base_config(tiny, tmp_path / "a", **common)), progress=False)
    feat = run(load_config(base=base_config(tiny, tmp_path / "b", features={"weight": 2.0, "loss": "mse"}, **common)),
               progress=False)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    # step 1 sees the same initial weights: the total is the logit loss plus weight x feature term
    assert b[0]["loss"] == pytest.approx(a[0]["loss"] + 2.0 * b[0]["feature_loss"], rel=1e-4)
    assert b[-1]["feature_loss"] < b[0]["feature_loss"]
    s = feat["method_summary"]["features"]
    assert s["pairs"] == [[0, 1], [1, 3]] and s["adapter_params"] == 0  # spread evenly, same width
    assert "features" not in plain.get("method_summary", {})


def test_narrower_student_trains_adapters_that_are_not_saved(tiny, tmp_path):
    """A student of another width (same tokenizer): adapters are trained, checkpointed, and left
    out of the saved student, which reloads as a plain model."""
    out = tmp_path / "run"
    cfg = base_config(tiny, out, student={"model": str(narrow_student(tiny, tmp_path / "narrow")), "init": None},
                      features={"weight": 1.0, "layers": [[0, 1], [1, 3]]}, eval=QUIET, data={"max_eval_rows": 4},
                      train={"max_steps": 3})
    rep = run(load_config(base=cfg), progress=False)
    s = rep["method_summary"]["features"]
    assert s["adapter_params"] == 2 * 32 * 64
    from safetensors.torch import load_file

    saved = load_file(str(out / "student" / "model.safetensors"))
    assert not any("maps" in k or k.startswith("extra") for k in saved)
    ckpt = load_file(str(next((out / "checkpoints").glob("step-*")) / "model.safetensors"))
    assert any(k.startswith("extra.maps.0") for k in ckpt)  # adapters resume with the run


def test_feature_distillation_needs_a_live_teacher(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o", teachers=[{"model": str(tiny / "teacher")}, {"model": str(tiny / "teacher")}],
                      features={"weight": 1.0}, eval=QUIET)
    cfg["teacher"] = {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("kdistill: error:")]
    assert len(err) == 1 and "features: feature distillation needs one live teacher model" in err[0]


def test_bad_layer_pairs_are_one_line_errors(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o", features={"weight": 1.0, "layers": [[0]]}, eval=QUIET)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("kdistill: error:")]
    assert len(err) == 1 and "features.layers: expected 'auto' or [[student_block, teacher_block]" in err[0]


def test_features_with_a_method_that_ignores_them_is_refused():
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="features: feature distillation is a term of the logit loss"):
        load_config(base={"output_dir": "x", "method": "sequence", "features": {"weight": 1.0}})
