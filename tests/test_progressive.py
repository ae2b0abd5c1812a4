"""method: progressive — stage 0 at the configured size, then smaller cuts, each distilled."""

from __future__ import annotations

import json

import pytest

from conftest import base_config
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.run import run

QUIET = {"generate": False, "speed_prompts": 0}


def _cfg(tiny, out, **progressive):
    return base_config(tiny, out, method="progressive", eval=QUIET, data={"max_eval_rows": 4},
                       student={"init": {"num_layers": 3, "layer_selection": "uniform"}},
                       train={"max_steps": 2, "save_every": 1}, progressive=progressive)


def test_stages_shrink_compose_their_block_maps_and_resume(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(base=_cfg(tiny, out, layers=[2, 1]))
    rep = run(cfg, progress=False)
    stages = rep["method_summary"]["stages"]
    assert [s["layers"] for s in stages] == [3, 2, 1] and all(s["teacher"] == "original" for s in stages)
    maps = [s["teacher_layers"] for s in stages]
    assert maps[0] == [0, 2, 3]  # uniform cut of the 4-layer teacher
    assert set(maps[1]) <= set(maps[0]) and set(maps[2]) <= set(maps[1])  # later cuts keep original indices
    assert rep["student"]["teacher_layers"] == maps[2] and rep["student"]["params"] < stages[0]["params"]
    saved = json.loads((out / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and saved["kdistill_teacher_layers"] == maps[2]
    for k, n in enumerate([3, 2, 1]):
        assert (out / "progressive" / f"stage-{k}-{n}" / "done.json").is_file()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["stage-0"] * 2 + ["stage-1"] * 2 + ["stage-2"] * 2
    again = run(cfg, progress=False)  # every stage done: nothing retrained, the same student
    assert again["training"]["resumed_from"] == "stage 0 (finished earlier)"
    assert again["student"]["metrics"] == rep["student"]["metrics"]


def test_teacher_assistant_stages(tiny, tmp_path):
    rep = run(load_config(base=_cfg(tiny, tmp_path / "ta", layers=[1], teacher="previous")), progress=False)
    assert [s["teacher"] for s in rep["method_summary"]["stages"]] == ["original", "stage-0"]


def test_progressive_config_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="each smaller than the one before"):
        load_config(base=_cfg(tiny, tmp_path / "x", layers=[2, 2]))
    with pytest.raises(ConfigError, match="set progressive.layers"):
        load_config(base={"output_dir": "x", "method": "progressive"})
    from kdistill.cli import main
    import yaml

    bad = _cfg(tiny, tmp_path / "y", layers=[3])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2


def test_frozen_embeddings_stay_frozen_in_later_stages(tiny, tmp_path):
    from safetensors.torch import load_file

    from kdistill.models import load_model

    cfg = _cfg(tiny, tmp_path / "f", layers=[1])
    cfg["student"]["freeze_embeddings"] = True
    run(load_config(base=cfg), progress=False)
    teacher, _ = load_model(str(tiny / "teacher"))
    final = load_file(str(tmp_path / "f" / "student" / "model.safetensors"))
    assert (final["model.embed_tokens.weight"] == teacher.get_input_embeddings().weight).all()
