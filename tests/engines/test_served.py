"""A real vLLM server as the teacher: its top-k log-probs train a student (logit, on_policy), fill a
cache whose manifest records the server's identity, and answer `kdistill generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import base_config
from kdistill.cli import main
from kdistill.commands.cache_teacher import cache_teacher
from kdistill.config import load_config
from kdistill.data import encode_examples, load_examples, renderer_for
from kdistill.models import load_model
from kdistill.run import run
from kdistill.teachers.served import ServedTeacher

from .conftest import SERVED_NAME

K = 16
QUIET = {"generate": False, "speed_prompts": 0}


def api(base: str, k: int = K) -> dict:
    return {"base_url": base, "model": SERVED_NAME, "logprobs": k, "max_retries": 2, "backoff_base": 0.05,
            "timeout": 120}


def config(models, out, base, **sections) -> dict:
    cfg = base_config(models, out, **sections)
    cfg["teacher"] = {"api": api(base)}
    cfg["student"] = {"model": str(models / "student")}
    cfg["train"] = {**cfg["train"], "max_steps": 2}
    cfg["eval"] = {**cfg["eval"], **QUIET}
    cfg["data"] = {**cfg["data"], "max_eval_rows": 4}
    return cfg


def test_served_top_k_equals_transformers_in_float32(models, server):
    base, folder = server
    teacher, tok = load_model(str(folder))
    cfg = load_config(base=base_config(models, models / "unused"))
    feats, _ = encode_examples(renderer_for(cfg, tok), load_examples(models / "train.jsonl")[:4])
    served = ServedTeacher(load_config(base=config(models, models / "u2", base)).teacher.api, len(tok))
    assert "checked" in served.check_tokenizer(tok)
    got = served.sequence_logprobs([f["input_ids"] for f in feats])
    worst = 0.0
    for f, (idx, lp, own) in zip(feats, got):
        with torch.no_grad():
            ref = torch.log_softmax(teacher(torch.tensor([f["input_ids"]])).logits[0, :-1].float(), -1)
        top = ref.topk(K)
        assert np.array_equal(idx[:, 0], top.indices[:, 0].numpy())  # the same top-1 everywhere
        worst = max(worst, float(np.abs(lp - top.values.numpy()).max()))
    print(f"served vs transformers top-{K} log-probs: max |diff| {worst:.2e} nats")
    assert worst < 1e-3


@pytest.mark.parametrize("method", ["logit", "on_policy"])
def test_runs_train_from_the_server(models, server, tmp_path, method):
    extra = {"on_policy": {"lambda": 1.0, "max_new_tokens": 4}} if method == "on_policy" else {}
    rep = run(load_config(base=config(models, tmp_path / method, server[0], method=method, **extra)), progress=False)
    assert rep["training"]["steps"] == 2 and rep["teacher"]["kind"] == "api"
    if method == "on_policy":
        assert rep["method_summary"]["on_policy_batches"] == 2


def test_a_cut_student_and_a_served_teacher_combine_through_init_from(models, server, tmp_path):
    cfg = config(models, tmp_path / "cut", server[0])
    cfg["student"] = {"init": {"from": str(server[1]), "num_layers": 2, "layer_selection": "uniform"}}
    rep = run(load_config(base=cfg), progress=False)
    assert rep["student"]["teacher_layers"] == [0, 3] and rep["training"]["steps"] == 2


def _cli(args) -> tuple[int, list[str]]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, [l for l in err.getvalue().splitlines() if l.startswith("kdistill: error:")]


def test_cache_from_the_server_records_who_served_it(models, server, tmp_path):
    import vllm

    from conftest import make_rows, write_jsonl

    base, folder = server
    cache = tmp_path / "cache"
    cfg = config(models, tmp_path / "c", base, cache={"path": str(cache)})
    stats = cache_teacher(load_config(base=cfg), say=lambda _: None, progress=False)
    assert stats["rows"] == 32
    who = json.loads((cache / "manifest.json").read_text())["served"]
    assert who["model"] == SERVED_NAME and who["root"] == str(folder) and who["max_model_len"] == 512
    assert who["version"] == vllm.__version__ and who["logprob_dtype"] == "float32"

    # the cache trains a student without the server
    tcfg = config(models, tmp_path / "t", base)
    tcfg["teacher"] = {"cache": str(cache)}
    assert run(load_config(base=tcfg), progress=False)["training"]["steps"] == 2

    # more rows, but the manifest says the cache came from a bfloat16 server: refused, in one line
    m = json.loads((cache / "manifest.json").read_text())
    m["served"]["logprob_dtype"] = "bfloat16"
    (cache / "manifest.json").write_text(json.dumps(m))
    cfg["data"]["train"] = str(write_jsonl(tmp_path / "more.jsonl", make_rows(40, 1)))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, err = _cli(["cache-teacher", str(tmp_path / "c.yaml"), "--no-progress"])
    assert rc == 2 and len(err) == 1
    assert "another served teacher" in err[0] and "'bfloat16', now 'float32'" in err[0]
    assert "cache.accept_teacher_change" in err[0]
    rc, err = _cli(["cache-teacher", str(tmp_path / "c.yaml"), "--no-progress", "--set",
                    "cache.accept_teacher_change=true"])
    assert rc == 0 and not err
    m = json.loads((cache / "manifest.json").read_text())
    assert sum(e["samples"] for e in m["shards"]) == 40 and m["served_changes"][0]["logprob_dtype"] == "float32"


def test_generate_from_the_server_resumes_without_asking_twice(models, server, tmp_path):
    from conftest import WORDS, write_jsonl
    from kdistill.answers import generate

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"what is the first name {w} {w}"}
                                                  for i, w in enumerate(WORDS[:12])])
    cfg = {"output_dir": str(tmp_path / "g"),
           "teacher": {"api": {"base_url": server[0], "model": SERVED_NAME, "max_retries": 1, "backoff_base": 0.05}},
           "generate": {"prompts": str(prompts), "max_new_tokens": 8, "temperature": 0.0}}
    s = generate(load_config(base=cfg), progress=False)
    assert s["succeeded"] + s["failed"] == 12 and s["succeeded"] > 0
    rows = [json.loads(l) for l in (tmp_path / "g" / "teacher.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows) == s["succeeded"]
    again = generate(load_config(base=cfg), progress=False)
    assert again["already_done"] == s["succeeded"] and again["succeeded"] == 0
    assert (tmp_path / "g" / "teacher.jsonl").read_text().count("\n") == len(rows)
