"""A served teacher's identity in the cache manifest (model root, max_model_len, /version, the
dtype of its log-probs measured on a probe), and ``student.init.from`` beside a served teacher."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import base_config, make_rows, write_jsonl
from fake_openai import FakeOpenAI, model_prompt_logprobs
from kdistill.cli import main
from kdistill.commands.cache_teacher import cache_teacher
from kdistill.config import load_config
from kdistill.models import load_model
from kdistill.run import run
from kdistill.teachers.served_identity import identity_mismatch, logprob_dtype

K = 8


@pytest.fixture()
def teacher(tiny):
    return load_model(str(tiny / "teacher"))


def start(teacher, dtype=None, version="0.32.0", max_len=512) -> FakeOpenAI:
    model, tok = teacher
    srv = FakeOpenAI(model="tiny-teacher")
    srv.prompt_logprobs = model_prompt_logprobs(model, logit_dtype=dtype)
    srv.tokenize = lambda text: tok.encode(text, add_special_tokens=False)
    srv.model_info = {"root": "/models/tiny", "max_model_len": max_len}
    srv.version = version
    return srv.start()


@pytest.mark.parametrize("dtype, want", [(None, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_the_dtype_of_log_probs_is_measured(teacher, dtype, want):
    model, tok = teacher
    ids = torch.tensor([tok.encode("what is the first name alpha beta gamma delta echo foxtrot golf")])
    with torch.no_grad():
        logits = model(ids).logits[0]
    lp = torch.log_softmax((logits.to(dtype) if dtype else logits).float(), -1).topk(K).values.numpy()
    assert logprob_dtype(lp) == want
    assert logprob_dtype(lp[:1, :2]) == "unknown"  # too little to tell


def test_identity_mismatch_names_what_changed():
    a = {"model": "m", "root": "/r", "max_model_len": 512, "version": "0.32.0", "logprob_dtype": "float32",
         "probe_top1": [-0.5, -1.0]}
    assert identity_mismatch(a, dict(a)) is None
    assert identity_mismatch(a, {**a, "probe_top1": [-0.5, -1.001]}) is None  # noise
    assert "max_model_len" in identity_mismatch(a, {**a, "max_model_len": 4096})
    assert "'0.32.0', now '0.33.0'" in identity_mismatch(a, {**a, "version": "0.33.0"})
    assert "moved by up to 0.3" in identity_mismatch(a, {**a, "probe_top1": [-0.5, -1.3]})


def _cfg(tiny, tmp_path, srv, train) -> dict:
    cfg = base_config(tiny, tmp_path / "out", cache={"path": str(tmp_path / "cache")}, eval={"speed_prompts": 0},
                      data={"train": str(train)})
    cfg["teacher"] = {"api": {"base_url": srv.base_url, "model": "tiny-teacher", "logprobs": K, "max_retries": 1,
                              "backoff_base": 0.01}}
    cfg["student"] = {"model": str(tiny / "student")}
    return cfg


def test_a_cache_from_a_bfloat16_server_is_not_extended_from_a_float32_one(tiny, teacher, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    few = write_jsonl(tmp_path / "few.jsonl", make_rows(64, 1)[:24])
    bf16 = start(teacher, torch.bfloat16)
    try:
        cache_teacher(load_config(base=_cfg(tiny, tmp_path, bf16, few)), say=lambda _: None, progress=False)
    finally:
        bf16.stop()
    who = json.loads((tmp_path / "cache" / "manifest.json").read_text())["served"]
    assert who == {**who, "model": "tiny-teacher", "root": "/models/tiny", "max_model_len": 512, "version": "0.32.0",
                   "logprob_dtype": "bfloat16"}

    fp32 = start(teacher)
    try:
        n = len(fp32.requests)
        cfg = _cfg(tiny, tmp_path, fp32, few)
        cache_teacher(load_config(base=cfg), say=lambda _: None, progress=False)  # nothing to do: nothing asked
        assert len(fp32.requests) == n
        cfg["data"]["train"] = str(tiny / "train.jsonl")  # 40 more rows, from a server that now computes in float32
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        rc = main(["cache-teacher", str(tmp_path / "c.yaml"), "--no-progress"])
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("kdistill: error:")]
        assert rc == 2 and len(err) == 1
        assert "another served teacher: log-prob dtype (measured on a probe) was 'bfloat16', now 'float32'" in err[0]
        assert "cache.accept_teacher_change: true" in err[0]
        manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
        assert sum(e["samples"] for e in manifest["shards"]) == 24  # nothing was added
        rc = main(["cache-teacher", str(tmp_path / "c.yaml"), "--no-progress", "--set", "cache.accept_teacher_change=true"])
        assert rc == 0
    finally:
        fp32.stop()
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sum(e["samples"] for e in manifest["shards"]) == 64
    assert manifest["served"]["logprob_dtype"] == "bfloat16" and manifest["served_changes"][0]["logprob_dtype"] == "float32"


def test_a_served_teacher_and_a_student_cut_from_a_local_copy(tiny, teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = start(teacher)
    try:
        cfg = base_config(tiny, tmp_path / "o", train={"max_steps": 2},
                          eval={"generate": False, "speed_prompts": 0}, data={"max_eval_rows": 4})
        cfg["teacher"] = {"api": {"base_url": srv.base_url, "model": "tiny-teacher", "logprobs": K}}
        cfg["student"] = {"init": {"from": str(tiny / "teacher"), "num_layers": 2, "layer_selection": "first_last"}}
        assert load_config(base=cfg).student.init.from_ == str(tiny / "teacher")
        rep = run(load_config(base=cfg), progress=False)
    finally:
        srv.stop()
    assert rep["student"]["teacher_layers"] == [0, 1] and rep["teacher"]["kind"] == "api"
    assert rep["training"]["steps"] == 2 and "layers 0-1" in rep["student"]["name"]
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["student"]["init"]["from"] == str(tiny / "teacher")  # written back under its own name
