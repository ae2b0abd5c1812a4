"""Bad input: exit status 2 and one line naming the key, file or row, before any training."""

import json

import pytest
import yaml

from conftest import base_config, write_jsonl
from kdistill.cli import main


def run_cli(tmp_path, cfg: dict, capsys, *extra) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["run", str(path), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def one_line_error(rc, err):
    assert rc == 2
    lines = [l for l in err.splitlines() if l.startswith("kdistill: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_config_file(tmp_path, capsys):
    rc = main(["run", str(tmp_path / "nope.yaml")])
    line = one_line_error(rc, capsys.readouterr().err)
    assert "nope.yaml" in line and "not found" in line


def test_unknown_key_is_named_with_suggestion(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    cfg["loss"]["divergnce"] = "jsd"
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "loss.divergnce" in line and "did you mean 'divergence'" in line
    assert not (tmp_path / "o").exists()  # stopped before anything was written


def test_unknown_top_level_key(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    cfg["trian"] = {"max_steps": 3}
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "trian" in line and "did you mean 'train'" in line


def test_wrong_type(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o", train={"batch_size": "eight"})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "train.batch_size" in line and "eight" in line


def test_unknown_divergence(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o", loss={"divergence": "forward_kll"})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "loss.divergence" in line and "forward_kl" in line


def test_override_typo_is_refused(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    line = one_line_error(*run_cli(tmp_path, cfg, capsys, "--set", "train.max_stepz=3"))
    assert "train.max_stepz" in line


def test_missing_data_file(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o", data={"train": str(tmp_path / "missing.jsonl")})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "data.train" in line and "missing.jsonl" in line


def test_row_without_prompt(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"question": "x", "answer": "y"}) + "\n")
    cfg = base_config(tiny, tmp_path / "o", data={"train": str(bad)})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "bad.jsonl:2" in line and "prompt" in line


def test_row_without_response(tiny, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "only a prompt"}])
    cfg = base_config(tiny, tmp_path / "o", data={"train": str(bad)})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "bad.jsonl:2" in line and "response" in line


def test_bad_json_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    cfg = base_config(tiny, tmp_path / "o", data={"train": str(bad)})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "bad.jsonl:2" in line and "JSON" in line


def test_empty_dataset(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = base_config(tiny, tmp_path / "o", data={"train": str(empty)})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "empty.jsonl" in line and "no rows" in line


def test_student_with_other_vocabulary(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    cfg["student"] = {"model": str(tiny / "other_student")}
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "student.model" in line and "tokenizer" in line
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_missing_teacher_folder(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o", teacher={"model": str(tmp_path / "no_teacher")})
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "teacher.model" in line


def test_student_both_model_and_init(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    cfg["student"]["model"] = str(tiny / "student")
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "student" in line and "only one" in line


def test_layer_index_out_of_range(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    cfg["student"]["init"]["layer_selection"] = [0, 9]
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "layer_selection" in line and "9" in line


@pytest.mark.parametrize("value", ["importance", "uniform", "first", "last", "first_last", [0, 3]])
def test_layer_selection_values_validate(tiny, tmp_path, value):
    from kdistill.config import load_config

    cfg = base_config(tiny, tmp_path / "o")
    cfg["student"]["init"]["layer_selection"] = value
    assert load_config(base=cfg).student.init.layer_selection == value


def test_invalid_layer_selection_name(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    cfg["student"]["init"]["layer_selection"] = "random"
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "student.init.layer_selection" in line and "importance" in line


def test_logit_with_api_teacher_points_to_sequence(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o")
    cfg["teacher"] = {"api": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    cfg["student"] = {"model": str(tiny / "student")}
    line = one_line_error(*run_cli(tmp_path, cfg, capsys))
    assert "teacher.api" in line and "method: sequence" in line


def test_messages_ending_on_a_user_turn_take_their_answer_from_response(tmp_path):
    """A few-shot row (``messages`` with a context turn, ending on the user's question) may carry its
    answer as ``response``; two different answers are one line naming the file and line."""
    from kdistill.data import load_examples
    from kdistill.errors import DataError

    shot = [{"role": "user", "content": "Name? Ann Lee came."}, {"role": "assistant", "content": "Ann Lee", "train": False},
            {"role": "user", "content": "Name? Bo Chan left."}]
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "messages": shot, "response": "Bo Chan"}) + "\n")
    (ex,) = load_examples(good, require_response=True)
    assert ex.response == "Bo Chan" and ex.messages[-1]["content"] == "Name? Bo Chan left."
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps({"id": "b", "messages": shot + [{"role": "assistant", "content": "Bo Chan"}],
                                 "response": "Ann Lee"}) + "\n")
    with pytest.raises(DataError, match=r"twice.jsonl:1: two different responses"):
        load_examples(twice, require_response=True)
