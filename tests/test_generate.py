"""`kdistill generate`: resumable, append-only teacher answers (API and local teachers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from fake_openai import serve
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import load_examples
from kdistill.errors import ConfigError
from kdistill.answers import RATIONALE_SYSTEM, generate, split_rationale

KEY = "sk-live-TOPSECRET-77a1c3"


@pytest.fixture()
def server(monkeypatch):
    yield from serve(monkeypatch, KEY, "KD_GEN_KEY")


def gen_config(tmp: Path, server, prompts: Path, **gen) -> dict:
    return {
        "output_dir": str(tmp / "out"),
        "teacher": {"api": {"base_url": server.base_url, "model": "teacher-x", "api_key_env": "KD_GEN_KEY",
                            "max_concurrency": 2, "timeout": 30, "max_retries": 2, "backoff_base": 0.01,
                            "backoff_max": 0.02}},
        "generate": {"prompts": str(prompts), "temperature": 0.0, "max_new_tokens": 32, **gen},
    }


def valid_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().split("\n"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def assert_no_key(root: Path, *texts: str) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    for t in texts:
        assert KEY not in t


def test_kill9_midrun_then_resume_exactly_once(server, tmp_path):
    server.delay = 0.12  # 40 prompts, 2 at a time: ~2.4 s of answering, so the kill lands mid-run
    n = 40
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(n)])
    cfg_path = tmp_path / "gen.yaml"
    cfg_path.write_text(yaml.safe_dump(gen_config(tmp_path, server, prompts)))
    out = tmp_path / "out" / "teacher.jsonl"
    cmd = [sys.executable, "-m", "kdistill.cli", "generate", str(cfg_path)]
    env = {**os.environ, "KD_GEN_KEY": KEY}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240  # generous: a loaded CI machine can take long to start Python + torch
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the generation ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    out1, err1 = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    at_kill = {r["id"] for r in valid_rows(out)}
    assert 6 <= len(at_kill) < n  # really killed mid-run
    with server.lock:
        server.requests.clear()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(l) for l in out.read_text().splitlines()]  # every line is valid JSON
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(f"p{i}" for i in range(n)) and len(set(ids)) == n  # each prompt once
    resent = server.prompts_requested()
    assert len(resent) == len(set(resent))  # no duplicate request in the resumed run
    answered_before = {f"question {i[1:]}" for i in at_kill}
    assert not answered_before & set(resent)  # nothing answered before the kill was asked again
    assert len(resent) == n - len(at_kill)
    assert all(r["response"] == "echo: " + r["prompt"] and r["finish_reason"] == "stop" for r in rows)
    assert rows[0]["teacher"] == "api:teacher-x" and rows[0]["sampling"]["temperature"] == 0.0
    assert "req/s" in done.stderr and f"{n}/{n}" in done.stderr  # the progress bar
    assert_no_key(tmp_path, out1, err1, done.stdout, done.stderr)
    load_examples(out)  # valid training rows as they are


def test_torn_last_line_is_dropped_and_resumed(server, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(5)])
    cfg = load_config(base=gen_config(tmp_path, server, prompts))
    out = tmp_path / "out" / "teacher.jsonl"
    out.parent.mkdir(parents=True)
    good = [{"id": f"p{i}", "prompt": f"q{i}", "response": f"old {i}", "finish_reason": "stop"} for i in range(2)]
    out.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"id": "p2", "prompt": "q2", "respo')
    s = generate(cfg, progress=False)
    assert s["already_done"] == 2 and s["succeeded"] == 3 and s["torn_lines_dropped"] == 1 and s["complete"]
    assert sorted(server.prompts_requested()) == ["q2", "q3", "q4"]
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows[:2]] == ["p0", "p1"] and rows[0]["response"] == "old 0"
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(5)]
    again = generate(cfg, progress=False)  # nothing left: no request at all
    assert again["already_done"] == 5 and len(server.requests) == 3


def test_bad_prompt_lines_are_reported_and_skipped(server, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fine one"}\n{not json\n{"text": "no prompt"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    said: list[str] = []
    s = generate(load_config(base=gen_config(tmp_path, server, p)), say=said.append, progress=False)
    assert s["bad_prompt_lines"] == 2 and s["succeeded"] == 2 and s["complete"]
    text = "\n".join(said)
    assert f"{p}:2: not valid JSON" in text and f"{p}:3:" in text
    rows = [json.loads(l) for l in (tmp_path / "out" / "teacher.jsonl").read_text().splitlines()]
    conv = next(r for r in rows if "messages" in r)
    assert conv["messages"][-1] == {"role": "assistant", "content": "echo: hi"}
    assert load_examples(tmp_path / "out" / "teacher.jsonl")[1].response == "echo: hi"


def test_failures_recorded_apart_and_retried_on_rerun(server, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok one"}, {"prompt": "never"}])
    server.plan = {"never": ["empty"] * 3}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(gen_config(tmp_path, server, prompts)))
    assert main(["generate", str(cfg_path), "--no-progress"]) == 1  # incomplete
    out = tmp_path / "out" / "teacher.jsonl"
    assert [r["prompt"] for r in valid_rows(out)] == ["ok one"]  # the failure is not an answer
    fails = [json.loads(l) for l in (tmp_path / "out" / "teacher.failures.jsonl").read_text().splitlines()]
    assert fails[0]["error"] == "empty response" and fails[0]["attempts"] == 3
    summary = json.loads((tmp_path / "out" / "teacher.summary.json").read_text())
    assert summary["failed"] == 1 and summary["retried"] == 2
    assert main(["generate", str(cfg_path), "--no-progress"]) == 0  # the server answers now
    assert sorted(r["prompt"] for r in valid_rows(out)) == ["never", "ok one"]
    assert server.prompts_requested().count("ok one") == 1


def test_rationale_style_samples_and_settings_guard(server, tmp_path):
    server.responder = lambda msgs: "Rationale: the first word is a name.\nAnswer: " + msgs[-1]["content"].split()[0]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "alpha beta", "reference": "alpha"}])
    base = gen_config(tmp_path, server, prompts, style="rationale", samples_per_prompt=2, temperature=0.7)
    s = generate(load_config(base=base), progress=False)
    assert s["succeeded"] == 2
    rows = valid_rows(tmp_path / "out" / "teacher.jsonl")
    assert sorted(r["id"] for r in rows) == ["a#0", "a#1"]
    assert all(r["answer"] == "alpha" and r["rationale"] == "the first word is a name." for r in rows)
    assert rows[0]["reference"] == "alpha" and rows[0]["prompt_id"] == "a"
    assert all(r["system"] == RATIONALE_SYSTEM for r in server.requests)
    base["generate"]["temperature"] = 0.2
    with pytest.raises(ConfigError, match="temperature"):
        generate(load_config(base=base), progress=False)


def test_explain_style_stores_the_system_message(server, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "why is the sky blue"}])
    generate(load_config(base=gen_config(tmp_path, server, prompts, style="explain")), progress=False)
    row = valid_rows(tmp_path / "out" / "teacher.jsonl")[0]
    assert "step by step" in row["system"] and server.requests[0]["system"] == row["system"]
    assert load_examples(tmp_path / "out" / "teacher.jsonl")[0].messages[0]["role"] == "system"


def test_split_rationale():
    assert split_rationale("Rationale: x then y.\nFinal answer: 42") == ("x then y.", "42")
    assert split_rationale("just text") == ("just text", None)


def test_fatal_401_via_cli(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KD_GEN_KEY", "sk-wrong-999")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(gen_config(tmp_path, server, prompts)))
    assert main(["generate", str(cfg_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "401" in err and "KD_GEN_KEY" in err and "sk-wrong-999" not in err


def test_generate_config_needs_no_student_or_data(tmp_path):
    cfg = load_config(base={"output_dir": str(tmp_path), "teacher": {"model": "x"}, "generate": {"prompts": "p.jsonl"}})
    assert cfg.student is None and cfg.generate.samples_per_prompt == 1


def test_local_teacher_generates_with_finish_reason(tiny, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is the first name alpha {w}"} for w in ("beta", "gamma", "delta")])
    cfg = load_config(base={"output_dir": str(tmp_path / "out"), "teacher": {"model": str(tiny / "teacher")},
                            "generate": {"prompts": str(prompts), "max_new_tokens": 4, "temperature": 0.0,
                                         "batch_size": 2}})
    s = generate(cfg, progress=False)
    assert s["succeeded"] + s["failed"] == 3
    rows = valid_rows(tmp_path / "out" / "teacher.jsonl")
    assert all(r["finish_reason"] in ("stop", "length") and r["teacher"] == str(tiny / "teacher") for r in rows)
    assert generate(cfg, progress=False)["already_done"] == len(rows)


def test_second_writer_on_the_same_output_is_refused(server, tmp_path):
    import fcntl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "teacher.lock", "w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another kdistill process"):
            generate(load_config(base=gen_config(tmp_path, server, prompts)), progress=False)
    assert generate(load_config(base=gen_config(tmp_path, server, prompts)), progress=False)["complete"]
