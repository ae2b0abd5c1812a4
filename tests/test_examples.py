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


def test_demo_task_holds_out_names_templates_and_phrasings():
    from kdistill.commands.demo import demo_rows
    from kdistill.commands.demo.task import split_names
    from kdistill.data import parse_row
    from kdistill.holdout import contamination

    train_names, test_names = split_names(0)
    assert not set(train_names) & set(test_names)
    rows = demo_rows()
    train, held = rows["train"], rows["eval"]
    for r in held:
        first = r["reference"].split()[0]
        assert first in test_names and r["reference"] in r["messages"][-1]["content"]
        assert r["messages"][1] == {"role": "assistant", "content": "Tariq Osei", "train": False}  # the worked example
    unseen = [r for r in held if r["task"] == "unseen_template"]
    seen = [r for r in held if r["task"] == "seen_template"]
    assert len(unseen) == len(seen) == 100
    tr = lambda key: {r[key] for r in train}  # noqa: E731
    assert not {r["template"] for r in unseen} & tr("template") and not {r["phrasing"] for r in unseen} & tr("phrasing")
    assert {r["template"] for r in seen} <= tr("template") and {r["phrasing"] for r in seen} <= tr("phrasing")
    assert len({r["messages"][-1]["content"] for r in held}) == 200
    c = contamination([parse_row(r, "t", False) for r in train], [parse_row(r, "e", False) for r in held], show=200)
    assert c["exact"] == 0  # a near duplicate can only be a seen-template row (same sentence, another name)
    assert all(e["id"].startswith("eval-seen") for e in c["examples"])
