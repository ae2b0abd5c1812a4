import json
from pathlib import Path

import yaml

from conftest import base_config
from kdistill.cli import main


def test_run_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny, out, train={"max_steps": 12})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["student"]["metrics"]["kl_to_teacher"] < rep["student_initial"]["metrics"]["kl_to_teacher"]
    for f in ("student/model.safetensors", "student/README.md", "config.yaml", "metrics.jsonl", "report.md", "loss.png", "metrics.png"):
        assert (out / f).exists(), f
