"""Every example config and the embedded demo config validate against the schema."""

from pathlib import Path

import pytest

from kdistill.config import load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_validates(path):
    cfg = load_config(str(path))
    assert cfg.output_dir


def test_demo_config_validates(tmp_path):
    from kdistill.commands.demo import demo_config_dict

    cfg = load_config(None, ["train.max_steps=3"], base=demo_config_dict(str(tmp_path / "demo")))
    assert cfg.teacher.model == "demo" and cfg.train.max_steps == 3
    assert cfg.data.train.startswith(str(tmp_path))


def test_demo_task_splits_names_disjointly():
    from kdistill.commands.demo.task import make_rows, split_names

    train_names, test_names = split_names(0)
    assert not set(train_names) & set(test_names)
    rows = make_rows(50, test_names, 2, "eval")
    assert all(r["reference"] in test_names and r["reference"] in r["prompt"] for r in rows)
    assert len({r["prompt"] for r in rows}) == 50
