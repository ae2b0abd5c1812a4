"""What kdistill guarantees when a user makes a mistake: nothing of theirs is lost or leaked."""

from __future__ import annotations

import pytest

from conftest import base_config
from kdistill.cli import main


def _write_config(path, cfg: dict):
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("where", ["data folder", "run folder"])
def test_cache_teacher_never_deletes_files_in_a_folder_it_does_not_own(tiny, tmp_path, capsys, where):
    """cache.path pointed at a folder with the user's files: refused with one line, every file intact."""
    folder = tmp_path / "mine"
    folder.mkdir()
    files = {"train.jsonl": (tiny / "train.jsonl").read_text(), "notes.txt": "my notes\n",
             "config.yaml": "output_dir: x\n", "metrics.jsonl": '{"step": 1}\n'}
    if where == "run folder":
        files["report.md"] = "# report\n"
    for name, text in files.items():
        (folder / name).write_text(text)
    cfg = base_config(tiny, tmp_path / "out", cache={"path": str(folder), "top_k": 4})
    code = main(["cache-teacher", str(_write_config(tmp_path / "c.yaml", cfg)), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "not a kdistill teacher cache" in err and str(folder) in err and "Traceback" not in err
    assert len([l for l in err.splitlines() if l.startswith("kdistill: error")]) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, text in files.items():
        assert (folder / name).read_text() == text


def test_cache_teacher_cleans_only_its_own_leftovers(tiny, tmp_path):
    """In a cache folder, an unlisted shard and a temp file (a crash's leftovers) are removed; a file
    the user put there is not."""
    folder = tmp_path / "cache"
    cfg = base_config(tiny, tmp_path / "out", cache={"path": str(folder), "top_k": 4, "shard_size": 32})
    path = _write_config(tmp_path / "c.yaml", cfg)
    assert main(["cache-teacher", str(path), "--no-progress"]) == 0
    (folder / "shard-00099.npz").write_bytes(b"stray")
    (folder / ".tmp-shard-00100.npz").write_bytes(b"torn")
    (folder / "README.txt").write_text("what this cache is for\n")
    assert main(["cache-teacher", str(path), "--no-progress"]) == 0
    names = {p.name for p in folder.iterdir()}
    assert "shard-00099.npz" not in names and ".tmp-shard-00100.npz" not in names
    assert (folder / "README.txt").read_text() == "what this cache is for\n"


# ---------------------------------------------------------------------------------------------
# helpers

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from conftest import write_jsonl  # noqa: E402

QUIET = {"generate": False, "speed_prompts": 0}


def one_line(code: int, err: str) -> str:
    """The run ended with exit 2 and exactly one `kdistill: error:` line, and no traceback."""
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.startswith("kdistill: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli(tmp_path, cfg: dict, capsys, command: str = "run", *extra: str) -> tuple[int, str]:
    path = tmp_path / f"c-{command}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main([command, str(path), "--no-progress", *extra])
    return code, capsys.readouterr().err


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# 2. a key is never printed


@pytest.mark.parametrize("suffix", ["\r", "\n", "\r\n", "\x1b"])
def test_a_key_with_control_characters_is_refused_and_never_printed(tmp_path, capsys, monkeypatch, suffix):
    secret = "sk-live-DONOTLEAK-1234"
    monkeypatch.setenv("KD_CRLF_KEY", secret + suffix)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1"}, {"prompt": "q2"}])
    cfg = {"output_dir": str(tmp_path / "out"), "generate": {"prompts": str(prompts), "output": str(tmp_path / "g.jsonl")},
           "teacher": {"api": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "KD_CRLF_KEY"}}}
    code, err = cli(tmp_path, cfg, capsys, "generate")
    line = one_line(code, err)
    assert "KD_CRLF_KEY" in line and "control characters" in line and "cannot reach" not in line
    out = capsys.readouterr()
    forms = [secret, secret.encode().hex(), base64.b64encode(secret.encode()).decode()]
    for text in (err, out.out, out.err):
        assert not any(f in text for f in forms)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def test_redaction_covers_what_an_http_stack_prints():
    from kdistill.teachers.api import secret_forms

    key = "sk-abc/DEF+123=="
    basic = base64.b64encode(f"user:{key}".encode()).decode()
    text = f"Illegal header value b'Bearer {key}' {key!r} Authorization: Basic {basic} {json.dumps(key)}"
    for form in secret_forms(key):
        text = text.replace(form, "***")
    assert key not in text and basic not in text and key.replace("/", "\\/") not in text


# ---------------------------------------------------------------------------------------------
# 3. a NaN model is never reported as a success


@pytest.mark.parametrize("override", ["train.learning_rate=.inf", "loss.temperature=.nan", "loss.alpha=-.inf",
                                      "train.max_steps=true", "output_dir="])
def test_infinite_or_wrong_typed_settings_are_exit_2(tiny, tmp_path, capsys, override):
    code, err = cli(tmp_path, base_config(tiny, tmp_path / "o", eval=QUIET), capsys, "run", "--set", override)
    line = one_line(code, err)
    assert override.split("=")[0] in line
    assert not (tmp_path / "o").exists()


def test_a_non_finite_loss_stops_training_with_one_line_and_no_student(tiny, tmp_path, capsys, monkeypatch):
    from kdistill.methods import logit

    real = logit.LogitMethod.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, num_items):
        calls["n"] += 1
        loss, info = real(self, model, batch, num_items)
        return (loss * float("nan") if calls["n"] >= 4 else loss), info

    monkeypatch.setattr(logit.LogitMethod, "loss", poisoned)
    out = tmp_path / "nan"
    code, err = cli(tmp_path, base_config(tiny, out, train={"max_steps": 6, "save_every": 2}, eval=QUIET), capsys)
    line = one_line(code, err)
    assert "training stopped at step 4" in line and "nan" in line and "step-2" in line
    assert not (out / "student").exists() and not (out / "report.json").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "step-2").is_dir()


def test_report_json_is_always_strict_json(tmp_path):
    from kdistill.report import write_report

    rep = {"method": "logit", "teacher": {"name": "t", "params": 1, "metrics": {"perplexity": float("inf")}},
           "student": {"name": "s", "params": 1, "metrics": {"perplexity": float("nan")}}, "retention": {},
           "samples": []}
    write_report(rep, tmp_path)
    text = (tmp_path / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN/Infinity literals
    assert "NaN" not in text and "Infinity" not in text


# ---------------------------------------------------------------------------------------------
# 4. one writer; a changed config is refused


def test_a_second_run_on_the_same_folder_is_refused_and_the_first_finishes_intact(tiny, tmp_path, capsys):
    out = tmp_path / "shared"
    cfg = base_config(tiny, out, train={"max_steps": 8, "save_every": 4}, eval=QUIET)
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    first = subprocess.Popen([sys.executable, "-m", "kdistill", "run", str(path), "--no-progress"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = out / ".kdistill.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
        time.sleep(0.05)
    assert lock.read_text().strip() == str(first.pid)
    code, err = cli(tmp_path, cfg, capsys)
    line = one_line(code, err)
    assert "another kdistill process" in line and str(first.pid) in line and str(out) in line
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(1, 9))  # no duplicated rows
    assert json.loads((out / "report.json").read_text())["training"]["steps"] == 8


def test_two_cache_writers_on_one_path(tiny, tmp_path, capsys):
    from kdistill.store import exclusive

    folder = tmp_path / "cache"
    folder.mkdir()
    cfg = base_config(tiny, tmp_path / "o", cache={"path": str(folder), "top_k": 4})
    with exclusive(folder / ".kdistill.lock", "a cache", "cache.path"):  # another writer holds it
        code, err = cli(tmp_path, cfg, capsys, "cache-teacher")
    assert "another kdistill process" in one_line(code, err)
    assert main(["cache-teacher", str(tmp_path / "c-cache-teacher.yaml"), "--no-progress"]) == 0


def test_a_changed_config_is_refused_on_rerun_naming_the_keys(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = base_config(tiny, out, train={"max_steps": 2, "save_every": 1}, eval=QUIET)
    assert cli(tmp_path, cfg, capsys)[0] == 0
    saved = (out / "config.yaml").read_text()
    changed = base_config(tiny, out, train={"max_steps": 2, "save_every": 1, "learning_rate": 1e-2},
                          student={"init": {"from_teacher": True, "num_layers": 3, "layer_selection": "first_last"}},
                          eval=QUIET)
    line = one_line(*cli(tmp_path, changed, capsys))
    assert "train.learning_rate" in line and "student.init.num_layers" in line and "accept_changes" in line
    assert (out / "config.yaml").read_text() == saved  # the config that made the model is kept
    # other data: named by its key
    other = tmp_path / "train2.jsonl"
    other.write_text((tiny / "train.jsonl").read_text().replace("alpha", "bravo"))
    line = one_line(*cli(tmp_path, base_config(tiny, out, data={"train": str(other)}, train={"max_steps": 2,
                                                                                               "save_every": 1},
                                               eval=QUIET), capsys))
    assert "data.train" in line
    # evaluation settings are not training settings: a rerun with others resumes
    assert cli(tmp_path, dict(cfg, eval={**QUIET, "batch_size": 3}), capsys)[0] == 0
    # an explicit override continues the run with the new settings, and says so
    more = base_config(tiny, out, train={"max_steps": 3, "save_every": 1, "resume": "accept_changes"}, eval=QUIET)
    code, err = cli(tmp_path, more, capsys)
    assert code == 0 and "train.max_steps" in err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 3


def test_a_run_is_never_written_into_a_foreign_folder(tiny, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml.bak").write_text("keep me\n")
    (mine / "notes.txt").write_text("keep me too\n")
    line = one_line(*cli(tmp_path, base_config(tiny, mine, eval=QUIET), capsys))
    assert "not empty and is not a kdistill run folder" in line
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml.bak", "notes.txt"]


# ---------------------------------------------------------------------------------------------
# 5. one line, never a traceback; torn side files are recovered


def test_output_folder_that_is_a_file_or_not_writable(tiny, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert "is a file" in one_line(*cli(tmp_path, base_config(tiny, tmp_path / "afile", eval=QUIET), capsys))
    line = one_line(*cli(tmp_path, base_config(tiny, Path("/proc/kdistill-cannot-write"), eval=QUIET), capsys))
    assert "/proc/kdistill-cannot-write" in line


@pytest.mark.parametrize("bad,expect", [
    (b'{"prompt": "caf\xe9", "response": "x"}\n', "not valid UTF-8"),
    (b'{"prompt": "\\ud800 lone", "response": "x"}\n', "lone surrogate"),
])
def test_bad_bytes_in_data_are_file_and_line(tiny, tmp_path, capsys, bad, expect):
    data = tmp_path / "train.jsonl"
    data.write_bytes((tiny / "train.jsonl").read_bytes() + bad)
    n = len(data.read_bytes().splitlines())
    line = one_line(*cli(tmp_path, base_config(tiny, tmp_path / "o", data={"train": str(data)}, eval=QUIET), capsys))
    assert f"{data}:{n}" in line and expect in line
    # generate reports the same line (and skips it) under the same policy
    from kdistill.answers import read_prompts

    assert any(f":{n}: " in b and expect in b for b in read_prompts(data).bad_lines)


def test_a_byte_order_mark_is_dropped_everywhere(tiny, tmp_path, capsys):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + (tiny / "train.jsonl").read_bytes())
    cfg = base_config(tiny, tmp_path / "o", data={"train": str(data)}, train={"max_steps": 1}, eval=QUIET)
    assert cli(tmp_path, cfg, capsys)[0] == 0
    from kdistill.answers import read_prompts

    got = read_prompts(data)
    assert not got.bad_lines and len(got.prompts) == 64


@pytest.mark.parametrize("text,expect", [
    (b"output_dir: x\ntrain:\n  max_steps: 3\n  max_steps: 4\n", "given twice"),
    (b"output_dir: x\nloop: &a [*a]\n", "refers to itself"),
    (b"output_dir: x\n# caf\xe9\n", "not valid UTF-8"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, expect):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    line = one_line(main(["run", str(path)]), capsys.readouterr().err)
    assert str(path) in line and expect in line


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"),
                                     PermissionError(13, "Permission denied")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_loses_nothing(tiny, tmp_path, capsys, monkeypatch,
                                                                           failure):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = {"n": 0}

    def full_disk(self, folder, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise failure
        return real(self, folder, *a, **k)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "full"
    cfg = base_config(tiny, out, train={"max_steps": 4, "save_every": 1}, eval=QUIET)
    line = one_line(*cli(tmp_path, cfg, capsys))
    assert "cannot write the checkpoint" in line and "step-2" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    monkeypatch.undo()
    assert cli(tmp_path, cfg, capsys)[0] == 0  # the rerun resumes from step 1
    assert json.loads((out / "report.json").read_text())["training"]["resumed_from"] == 1


@pytest.mark.parametrize("victim", ["eval_teacher.json", "eval_student_initial.json", "student_layers.json",
                                    "trainer_state.json", "model.safetensors", "run.json"])
def test_a_torn_side_file_is_recovered_on_rerun(tiny, tmp_path, capsys, victim):
    out = tmp_path / "torn"
    cfg = base_config(tiny, out, train={"max_steps": 3, "save_every": 1}, eval=QUIET)
    assert cli(tmp_path, cfg, capsys)[0] == 0
    first = json.loads((out / "report.json").read_text())
    target = {"trainer_state.json": out / "checkpoints" / "step-3" / "trainer_state.json",
              "model.safetensors": out / "checkpoints" / "step-3" / "model.safetensors"}.get(victim, out / victim)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # torn mid-write
    code, err = cli(tmp_path, cfg, capsys)
    assert code == 0, err
    again = json.loads((out / "report.json").read_text())
    assert again["student"]["metrics"]["kl_to_teacher"] == pytest.approx(first["student"]["metrics"]["kl_to_teacher"],
                                                                         rel=1e-4)
    if victim in ("trainer_state.json", "model.safetensors"):  # fell back to the checkpoint before
        assert again["training"]["resumed_from"] == 2


def test_a_torn_generate_meta_file_is_recovered(tmp_path, capsys):
    from kdistill.answers import _check_meta

    out = tmp_path / "g.jsonl"
    meta = tmp_path / "g.meta.json"
    _check_meta(out, {"teacher": "t", "temperature": 0.0}, have_rows=False)
    meta.write_text('{"teacher": "t", "tempera')
    _check_meta(out, {"teacher": "t", "temperature": 0.0}, have_rows=True)  # no traceback; rewritten
    assert json.loads(meta.read_text())["temperature"] == 0.0


def test_training_time_adds_up_across_resumes(tiny, tmp_path, monkeypatch):
    from conftest import Crash, crash_at_loss
    from kdistill.config import load_config
    from kdistill.run import run

    out = tmp_path / "t"
    cfg = load_config(base=base_config(tiny, out, train={"max_steps": 4, "save_every": 2}, eval=QUIET))
    crash_at_loss(monkeypatch, 3)
    with pytest.raises(Crash):
        run(cfg, progress=False)
    monkeypatch.undo()
    first = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["seconds"]
    rep = run(cfg, progress=False)
    assert first > 0 and rep["training"]["seconds"] >= round(first, 1)
    again = run(cfg, progress=False)["training"]
    assert again["seconds"] == rep["training"]["seconds"]  # finished: nothing added
    assert again["throughput"] is None and rep["training"]["throughput"]["measured_steps"] == 2  # nothing measured


def test_held_out_rows_equal_to_training_rows_are_flagged(tiny, tmp_path, capsys):
    cfg = base_config(tiny, tmp_path / "o", data={"eval": str(tiny / "train.jsonl")}, train={"max_steps": 1},
                      eval=QUIET)
    code, err = cli(tmp_path, cfg, capsys)
    assert code == 0 and "held-out rows are training rows" in err
