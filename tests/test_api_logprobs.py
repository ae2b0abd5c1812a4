"""A teacher served by vLLM (teacher.api.logprobs): its top-k log-probs over HTTP train the student.

The fake server answers /v1/completions with prompt_logprobs in vLLM's format, computed by the
tiny teacher model itself, so every figure can be checked against the local model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import base_config, make_tokenizer
from fake_openai import FakeOpenAI, model_prompt_logprobs
from kdistill.commands.cache_teacher import cache_teacher
from kdistill.teachers.local import model_topk as teacher_topk
from kdistill.topk_cache import TopKCache
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import collate, encode_examples, load_examples
from kdistill.errors import ConfigError
from kdistill.evaluate import logit_metrics
from kdistill.models import load_model
from kdistill.data import renderer_for as _renderer
from kdistill.run import evaluate as evaluate_only
from kdistill.run import run
from kdistill.teachers.served import ServedTeacher as ApiLogprobTeacher

KEY = "sk-served-SECRET-4242"
K = 8


@pytest.fixture()
def served(tiny, monkeypatch):
    """A fake vLLM server for the tiny teacher (chat answers echo the reference-free prompt)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("KD_SERVED_KEY", KEY)
    teacher, tok = load_model(str(tiny / "teacher"))
    srv = FakeOpenAI(model="tiny-teacher", key=KEY)
    srv.prompt_logprobs = model_prompt_logprobs(teacher)
    srv.tokenize = lambda text: tok.encode(text, add_special_tokens=False)
    srv.responder = lambda msgs: msgs[-1]["content"].split()[-2]  # "what is the first name A B" -> "A"
    srv.start()
    try:
        yield srv, teacher, tok
    finally:
        srv.stop()


def api_section(srv, k=K) -> dict:
    return {"base_url": srv.base_url, "model": "tiny-teacher", "api_key_env": "KD_SERVED_KEY", "logprobs": k,
            "max_retries": 2, "backoff_base": 0.01, "timeout": 30}


def served_config(tiny, srv, out, **sections) -> dict:
    cfg = base_config(tiny, out, **sections)
    cfg["teacher"] = {"api": api_section(srv)}
    cfg["student"] = {"model": str(tiny / "student")}
    return cfg


def _batch(tiny, tok, n=6):
    cfg = load_config(base=base_config(tiny, tiny / "unused"))
    feats, _ = encode_examples(_renderer(cfg, tok), load_examples(tiny / "train.jsonl")[:n])
    return feats, collate(feats, tok.pad_token_id)


def test_served_top_k_equals_the_local_teacher(tiny, served):
    """Position t of a batch takes the server's entry t+1: the signal equals the local model's top-k
    at every trained position, and each token's own log-prob is the model's."""
    srv, teacher, tok = served
    from kdistill.config import TeacherApiConfig

    t = ApiLogprobTeacher(TeacherApiConfig(**api_section(srv)), len(tok))
    assert "checked" in t.check_tokenizer(tok)
    feats, batch = _batch(tiny, tok)
    idx, lp, own = t.topk_at_labels(batch)
    ref_i, ref_l = teacher_topk(teacher, batch, len(tok), K)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(lp, ref_l, atol=2e-5, rtol=0)
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(), -1)
    keep = batch["labels"] != -100
    torch.testing.assert_close(own, full[keep].gather(-1, batch["labels"][keep][:, None]).squeeze(-1), atol=2e-5, rtol=0)
    sig = t.signal(batch).topk  # the same values, placed at the trained positions of [batch, seq, k]
    assert sig.indices.shape == (*batch["labels"].shape, K)
    assert torch.equal(sig.indices[keep], ref_i)
    # one request per row and call, each with the unpadded sequence up to its last trained token
    assert len(srv.requests) == 2 * len(feats) and all(r["body"]["prompt_logprobs"] == K for r in srv.requests)
    assert sorted(len(r["body"]["prompt"]) for r in srv.requests[:len(feats)]) == sorted(len(f["input_ids"]) for f in feats)


def test_logit_run_from_a_served_teacher(tiny, served, tmp_path):
    """method logit trains from the server; the report has the teacher's perplexity (equal to the
    local model's) and accuracy, and names what a served teacher cannot give."""
    srv, teacher, tok = served
    out = tmp_path / "run"
    cfg = served_config(tiny, srv, out, train={"max_steps": 4}, eval={"speed_prompts": 0}, data={"max_eval_rows": 6})
    rep = run(load_config(base=cfg), progress=False)
    assert rep["teacher"]["kind"] == "api" and rep["teacher"]["params"] is None
    eval_cfg = load_config(base=cfg)
    rows = load_examples(tiny / "eval.jsonl")[:6]
    feats, _ = encode_examples(_renderer(eval_cfg, tok), rows)
    local = logit_metrics(teacher, feats, tok.pad_token_id, len(tok), batch_size=8)
    assert rep["teacher"]["metrics"]["perplexity"] == pytest.approx(local["perplexity"], rel=1e-4)
    assert rep["teacher"]["metrics"]["accuracy"] == 1.0  # the fake server's chat answers are right
    assert rep["retention"]["perplexity"] is not None and rep["retention"]["kl_to_teacher"] is None
    assert set(rep["unavailable"]) == {"kl_to_teacher", "top1_agreement"}
    # it trains as the same teacher's top-k cache does (same rows, seed and loss; the cache rounds log-probs)
    cache = tmp_path / "cache"
    cache_teacher(load_config(base=base_config(tiny, tmp_path / "c", cache={"path": str(cache), "top_k": K},
                                               eval={"speed_prompts": 0})), say=lambda _: None, progress=False)
    ref = dict(cfg, output_dir=str(tmp_path / "from_cache"), teacher={"cache": str(cache)},
               eval={"generate": False, "speed_prompts": 0})
    run(load_config(base=ref), progress=False)
    served_losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    cached_losses = [json.loads(l)["loss"] for l in (tmp_path / "from_cache" / "metrics.jsonl").read_text().splitlines()]
    assert len(served_losses) == 4 and served_losses == pytest.approx(cached_losses, rel=1e-2)
    # a rerun (training complete) pays for nothing again: the teacher's held-out figures are kept
    n = len(srv.requests)
    assert run(load_config(base=cfg), progress=False)["teacher"]["metrics"] == rep["teacher"]["metrics"]
    assert len(srv.requests) == n
    # `kdistill eval` against the served teacher: the same teacher figures, no training
    again = evaluate_only(load_config(base=dict(cfg, output_dir=str(tmp_path / "ev"),
                                                student={"model": str(out / "student")})), say=lambda _: None)
    assert again["teacher"]["metrics"] == rep["teacher"]["metrics"] and again["teacher"]["kind"] == "api"
    for p in out.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p


def test_on_policy_sends_the_students_samples_to_the_server(tiny, served, tmp_path):
    srv, _, tok = served
    out = tmp_path / "op"
    cfg = served_config(tiny, srv, out, method="on_policy", train={"max_steps": 2, "batch_size": 4},
                        eval={"generate": False, "speed_prompts": 0}, data={"max_eval_rows": 2},
                        on_policy={"lambda": 1.0, "max_new_tokens": 6})
    rep = run(load_config(base=cfg), progress=False)
    assert rep["method_summary"]["on_policy_batches"] == 2
    renderer = _renderer(load_config(base=cfg), tok)
    dataset = {tuple(f["input_ids"]) for f in encode_examples(renderer, load_examples(tiny / "train.jsonl"))[0]}
    held_out = {tuple(f["input_ids"]) for f in encode_examples(renderer, load_examples(tiny / "eval.jsonl"))[0]}
    sent = [tuple(r["body"]["prompt"]) for r in srv.requests if r["body"].get("prompt_logprobs")]
    trained = [s for s in sent if s not in held_out]  # the teacher's held-out perplexity is asked for too
    # two steps of 4 rows, every sequence the student's sample: prompt + its completion, no dataset row
    assert len(trained) == 8 and not any(s in dataset for s in trained)


def test_cache_teacher_from_a_served_teacher_equals_the_local_cache(tiny, served, tmp_path):
    srv, _, tok = served
    local = base_config(tiny, tmp_path / "a", cache={"path": str(tmp_path / "local"), "top_k": K},
                        eval={"speed_prompts": 0})
    cache_teacher(load_config(base=local), say=lambda _: None, progress=False)
    remote = served_config(tiny, srv, tmp_path / "b", cache={"path": str(tmp_path / "served"), "top_k": K},
                           eval={"speed_prompts": 0})
    stats = cache_teacher(load_config(base=remote), say=lambda _: None, progress=False)
    a, b = TopKCache(tmp_path / "local"), TopKCache(tmp_path / "served")
    assert set(a.index()) == set(b.index()) and len(b) == 64  # every row of data.train
    for sid in a.index():
        ia, la = a.get(sid)
        ib, lb = b.get(sid)
        assert np.array_equal(ia, ib)
        np.testing.assert_allclose(la, lb, atol=2e-3)
    assert stats["teacher_eval"]["perplexity"] > 1 and stats["api"]["requests"] > 0
    # a rerun finds every row cached and asks the server for nothing
    n = len(srv.requests)
    cache_teacher(load_config(base=remote), say=lambda _: None, progress=False)
    assert len(srv.requests) == n


def _run_cli(tmp_path, cfg, capsys) -> tuple[int, str]:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["run", str(tmp_path / "c.yaml"), "--no-progress"])
    return code, capsys.readouterr().err


def test_a_server_without_prompt_logprobs_is_a_clear_error(tiny, served, tmp_path, capsys):
    srv, _, _ = served
    srv.prompt_logprobs = lambda ids, k: None  # e.g. an OpenAI-style server: the field is ignored
    code, err = _run_cli(tmp_path, served_config(tiny, srv, tmp_path / "r", eval={"speed_prompts": 0}), capsys)
    assert code == 2 and "returned no prompt_logprobs" in err and "vllm serve" in err and "Traceback" not in err


def test_more_logprobs_than_the_server_allows_is_a_clear_error(tiny, served, tmp_path, capsys):
    srv, _, _ = served
    cfg = served_config(tiny, srv, tmp_path / "r", eval={"speed_prompts": 0})
    cfg["teacher"]["api"]["logprobs"] = 32
    code, err = _run_cli(tmp_path, cfg, capsys)
    assert code == 2 and "max-logprobs" in err and "greater than max allowed: 20" in err


def test_a_served_model_with_another_tokenizer_is_refused(tiny, served, tmp_path, capsys):
    srv, _, _ = served
    other = make_tokenizer(320)
    srv.tokenize = lambda text: other.encode(text, add_special_tokens=False)
    code, err = _run_cli(tmp_path, served_config(tiny, srv, tmp_path / "r", eval={"speed_prompts": 0}), capsys)
    assert code == 2 and "tokenizes text differently" in err


@pytest.mark.parametrize("teacher,method,msg", [
    ({"model": "x", "api": {"base_url": "http://h/v1", "model": "m", "logprobs": 8}}, "logit", "without model or cache"),
])
def test_served_teacher_config_errors(teacher, method, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(base={"output_dir": "x", "method": method, "teacher": teacher})


def test_served_logprobs_refused_for_methods_that_cannot_use_them(tiny, served, tmp_path, capsys):
    srv, _, _ = served
    cfg = served_config(tiny, srv, tmp_path / "r", method="dpo", dpo={"pairs": str(tiny / "train.jsonl")})
    code, err = _run_cli(tmp_path, cfg, capsys)
    assert code == 2 and "teacher.api.logprobs" in err and "method dpo cannot use them" in err


def test_a_served_teacher_mixes_with_a_local_one(tiny, served, tmp_path):
    """teachers: [local model, vLLM server]: the top-k mixture trains, and the server is asked for
    every training sequence."""
    srv, _, _ = served
    cfg = base_config(tiny, tmp_path / "mix", train={"max_steps": 2}, eval={"generate": False, "speed_prompts": 0},
                      data={"max_eval_rows": 2})
    del cfg["teacher"]
    cfg["teachers"] = [{"model": str(tiny / "teacher"), "weight": 1.0}, {"api": api_section(srv), "weight": 1.0}]
    rep = run(load_config(base=cfg), progress=False)
    assert rep["teacher"]["kind"] == "local" and rep["training"]["steps"] == 2
    assert sum(1 for r in srv.requests if r["body"].get("prompt_logprobs")) == 2 * 8  # two batches of 8 rows


@pytest.mark.parametrize("ga", [1, 2])
def test_prefetch_changes_nothing_but_when_requests_are_made(tiny, served, tmp_path, ga):
    """teacher.api.prefetch: the losses are the same as without it, every sequence is asked for once,
    and every micro-batch's answer was requested before its loss asked for it (the order of the
    trainer's lookahead is tested in test_run.py)."""
    srv, _, _ = served
    srv.delay = 0.05
    runs = {}
    for prefetch in (False, True):
        out = tmp_path / f"p{prefetch}"
        cfg = served_config(tiny, srv, out, train={"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": ga},
                            eval={"generate": False, "speed_prompts": 0}, data={"max_eval_rows": 2})
        cfg["teacher"]["api"]["prefetch"] = prefetch
        n0 = len(srv.requests)
        rep = run(load_config(base=cfg), progress=False)
        losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs[prefetch] = (losses, len(srv.requests) - n0, rep["method_summary"]["served_teacher"])
    assert runs[True][0] == runs[False][0]  # exactly the same numbers
    assert runs[True][1] == runs[False][1]  # no sequence asked for twice, none skipped
    assert runs[False][2]["prefetched_batches"] == 0
    assert runs[True][2]["prefetched_batches"] == 4 * ga  # every micro-batch was requested ahead of its loss


def test_on_policy_filter_scores_candidates_with_the_served_teacher(tiny, served, tmp_path):
    """scorer: loglik with a vLLM server: each candidate's score is the served teacher's mean
    log-likelihood of it, the same number the local model gives; the best one is kept."""
    from kdistill.data import completion_feature
    from kdistill.scoring import loglik_scores

    srv, teacher, tok = served
    out = tmp_path / "opf"
    cfg = served_config(tiny, srv, out, method="on_policy_filter", train={"max_steps": 1},
                        eval={"generate": False, "speed_prompts": 0}, data={"max_eval_rows": 2},
                        on_policy_filter={"rounds": 1, "n": 2, "keep": 1, "max_new_tokens": 5, "prompts_per_round": 4})
    rep = run(load_config(base=cfg), progress=False)
    rdir = out / "on_policy_filter" / "round-1"
    cands = [json.loads(l) for l in (rdir / "candidates.jsonl").read_text().splitlines()]
    kept = {json.loads(l)["prompt_id"]: json.loads(l) for l in (rdir / "kept.jsonl").read_text().splitlines()}
    assert len(cands) == 4 and rep["method_summary"]["scorer"] == "loglik"
    for row in cands:
        feats = [completion_feature(row["prompt_ids"], c["completion_ids"]) for c in row["candidates"]]
        local = loglik_scores(teacher, feats, tok.pad_token_id, len(tok))
        assert [c["score"] for c in row["candidates"]] == pytest.approx(local, abs=1e-4)
        assert kept[row["id"]]["score"] == max(c["score"] for c in row["candidates"])
    assert rep["teacher"]["kind"] == "api" and "perplexity" in rep["teacher"]["metrics"]


def test_zephyr_uses_a_served_teacher_as_text(tiny, served, tmp_path):
    """zephyr needs the teacher's answers and ratings, not log-probs: a served-teacher config works
    through its chat endpoint, and the run says that logprobs is not used."""
    from kdistill.run import Run
    from kdistill.teachers.text import ApiTextTeacher

    srv, _, _ = served
    cfg = load_config(base=served_config(tiny, srv, tmp_path / "z", method="zephyr"))
    said: list[str] = []
    r = Run(cfg, said.append, progress=False)
    r.setup()
    r.load_teacher_weights()
    r.load_rows()
    r.load_student()
    r.build_teacher()
    assert any("logprobs is not used by method zephyr" in s for s in said)
    assert isinstance(r.teacher, ApiTextTeacher)
