"""Offline teacher cache: codec, round trip per divergence, resume after SIGKILL, corruption,
refusals, and a run trained from the cache (issue 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import base_config
from kdistill.commands.cache_teacher import cache_teacher
from kdistill.teachers.local import model_topk as teacher_topk
from kdistill.topk_cache import LOGPROB_SCALE, CacheError, TopKCache, decode_topk, encode_topk
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import collate, encode_examples, load_examples
from kdistill.losses import DIVERGENCES, TopK, distill_loss, fused_distill_loss
from kdistill.models import load_model
from kdistill.data import renderer_for as _renderer
from kdistill.run import run
from kdistill.teachers.cache import CachedTeacher

TOP_K = 16


def cache_cfg(tiny: Path, out: Path, cache_path: Path, **sections):
    cfg = base_config(tiny, out, cache={"path": str(cache_path), "top_k": TOP_K, "shard_size": 8, "batch_size": 8},
                      **sections)
    return cfg


_BUILT: dict = {}


@pytest.fixture(scope="session")
def tiny_cache(tiny, tmp_path_factory):
    """A top-16 cache of the tiny teacher on tiny/train.jsonl (built once per session, shared with
    test_multi_teacher.py, which imports this fixture)."""
    if str(tiny) not in _BUILT:
        root = tmp_path_factory.mktemp("cache")
        cfg = load_config(None, [], base=cache_cfg(tiny, root / "run", root / "cache"))
        stats = cache_teacher(cfg, say=lambda m: None, progress=False)
        _BUILT[str(tiny)] = (root / "cache", stats)
    return _BUILT[str(tiny)]


def _features(tiny, cfg_dict):
    cfg = load_config(None, [], base=cfg_dict)
    _, tok = load_model(str(tiny / "teacher"), with_tokenizer=True)
    feats, _ = encode_examples(_renderer(cfg, tok), load_examples(tiny / "train.jsonl"))
    return feats, tok


def _all_cached(path: Path) -> dict:
    c = TopKCache(path)
    return {sid: c.get(sid) for sid in c.index()}


# ---------------------------------------------------------------------------------------------
# codec


@pytest.mark.parametrize("vocab", [400, 70_000, 20_000_000])
def test_codec_round_trip(vocab):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, vocab if vocab < 100_000 else 1000, generator=g) * 3
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(TOP_K, -1)
    idx = top.indices.numpy().astype(np.int64)
    if vocab >= 100_000:
        idx = idx * (vocab // 1000)  # large ids: exercise the 3- and 4-byte id planes
    enc = encode_topk(idx, top.values.numpy(), vocab)
    assert enc["ids"].shape[0] == (2 if vocab <= 65536 else 3 if vocab <= 1 << 24 else 4)
    di, dl = decode_topk(enc["ids"], enc["top1"], enc["gaps"], enc["log_rest"])
    assert (di == idx).all()
    assert np.abs(dl - top.values.numpy()).max() <= 1.5 / LOGPROB_SCALE + 1e-5  # rounding + tail correction
    # the tail mass 1 - sum(top-k) is restored almost exactly
    want = 1 - np.exp(top.values.numpy().astype(np.float64)).sum(1)
    got = 1 - np.exp(dl.astype(np.float64)).sum(1)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# round trip: loss from the cache == loss from the live, uncompressed top-k


def test_bytes_per_token_and_manifest(tiny_cache):
    path, stats = tiny_cache
    m = json.loads((path / "manifest.json").read_text())
    assert m["top_k"] == TOP_K and m["format"] == "kdistill-topk-cache" and m["version"] == 2
    assert m["tokenizer_fingerprint"] and m["vocab_size"] > 0 and m["teacher"].endswith("teacher")
    assert all(len(e["sha256"]) == 64 and e["codec"] == 2 for e in m["shards"])
    assert stats["rows"] == 64 and stats["tokens"] > 0
    assert stats["bytes_per_token"] <= 192 * TOP_K / 64 + 40  # small k: per-row overhead weighs more


@pytest.fixture(scope="module")
def round_trip_inputs(tiny, tiny_cache, tmp_path_factory):
    """A batch of 16 rows: live uncompressed top-k, the cached top-k, the student's hidden/weight."""
    path, _ = tiny_cache
    feats, tok = _features(tiny, cache_cfg(tiny, tmp_path_factory.mktemp("rt"), path))
    teacher, _ = load_model(str(tiny / "teacher"), with_tokenizer=False)
    student, _ = load_model(str(tiny / "student"), with_tokenizer=False)
    V = len(tok)
    batch = collate(feats[:16], tok.pad_token_id)
    keep = batch["labels"] != -100
    i, l = teacher_topk(teacher, batch, V, TOP_K)
    live = TopK(torch.zeros(*keep.shape, TOP_K, dtype=torch.long), torch.zeros(*keep.shape, TOP_K))
    live.indices[keep], live.logprobs[keep] = i, l
    cached = CachedTeacher(path, V).signal(batch).topk
    with torch.no_grad():
        hidden = student.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        weight = student.get_output_embeddings().weight[:V]
    return batch, keep, live, cached, hidden, weight


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cache_round_trip_each_divergence(round_trip_inputs, divergence):
    batch, keep, live, cached, hidden, weight = round_trip_inputs
    # the same top-k set per position (entries whose log-probs round alike are stored in a canonical order)
    assert torch.equal(cached.indices[keep].sort(-1).values, live.indices[keep].sort(-1).values)
    logits = (hidden @ weight.t()).detach()
    for T in (1.0, 2.0):
        kw = dict(divergence=divergence, temperature=T, beta=0.3, skew=0.2)
        ref = distill_loss(logits, None, batch["labels"], teacher_topk=live, **kw)
        got = distill_loss(logits, None, batch["labels"], teacher_topk=cached, **kw)
        fused = fused_distill_loss(hidden, weight, None, None, batch["labels"], teacher_topk=cached, chunk_size=37, **kw)
        assert float(ref) > 0
        assert abs(float(got) - float(ref)) <= 1e-3 * abs(float(ref)), (divergence, T, float(got), float(ref))
        assert abs(float(fused.detach()) - float(got)) <= 1e-5 * abs(float(got)) + 1e-6


# ---------------------------------------------------------------------------------------------
# resumable: SIGKILL at the worst moments, rerun, every row exactly once

_KILLER = r"""
import os, signal, sys
import kdistill.topk_cache as c
n = int(sys.argv[1])
calls = {"shard": 0}
real = c.atomic_write
def write(path, data):
    real(path, data)
    if path.name.startswith("shard-"):
        calls["shard"] += 1
        if calls["shard"] == n:  # the shard is in place, the manifest does not list it yet
            os.kill(os.getpid(), signal.SIGKILL)
c.atomic_write = write
from kdistill.cli import main
sys.exit(main(["cache-teacher", sys.argv[2], "--no-progress"]))
"""


def test_resume_after_sigkill_exactly_once(tiny, tiny_cache, tmp_path):
    """SIGKILL right after a shard's rename, before the manifest lists it (the worst moment); a
    half-written temp file from another death lies beside it. The rerun computes only the missing
    rows: every row exactly once, same values as an uninterrupted run."""
    ref_path, _ = tiny_cache
    path = tmp_path / "cache"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(cache_cfg(tiny, tmp_path / "run", path)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run([sys.executable, "-c", _KILLER, "4", str(cfg)], env=env, capture_output=True,
                       timeout=120)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    m = json.loads((path / "manifest.json").read_text())
    assert len(m["shards"]) == 3 and (path / "shard-00003.npz").exists()  # written, not yet listed
    (path / ".tmp-shard-00004.npz").write_bytes((path / "shard-00003.npz").read_bytes()[:100])
    stats = cache_teacher(load_config(str(cfg)), say=lambda s: None, progress=False)
    assert stats["rows_computed"] == 64 - 3 * 8
    m = json.loads((path / "manifest.json").read_text())
    ids = []
    for e in m["shards"]:
        with np.load(path / e["file"]) as z:
            ids += [x.decode() for x in z["sample_ids"].tolist()]
    assert len(ids) == len(set(ids)) == 64  # none missing, none twice
    assert sorted(f.name for f in path.iterdir()) == sorted([".kdistill.lock", "manifest.json", "teacher_eval.json"]
                                                            + [e["file"] for e in m["shards"]])  # no leftovers
    got, ref = _all_cached(path), _all_cached(ref_path)
    assert got.keys() == ref.keys()
    for sid in ref:
        assert np.array_equal(got[sid][0], ref[sid][0]) and np.allclose(got[sid][1], ref[sid][1], atol=1e-6)


def test_corrupted_shard_detected_and_recomputed(tiny, tmp_path):
    path = tmp_path / "cache"
    cfg = load_config(None, [], base=cache_cfg(tiny, tmp_path / "run", path))
    cache_teacher(cfg, say=lambda s: None, progress=False)
    before = _all_cached(path)
    victim = path / json.loads((path / "manifest.json").read_text())["shards"][2]["file"]
    victim.write_bytes(victim.read_bytes()[:-50])  # truncated
    with pytest.raises(CacheError, match="checksum"):
        TopKCache(path).index()
    feats, tok = _features(tiny, cache_cfg(tiny, tmp_path, path))
    with pytest.raises(CacheError, match="checksum"):
        CachedTeacher.open(path, tok, len(tok), feats)
    said = []
    stats = cache_teacher(cfg, say=said.append, progress=False)
    assert stats["rows_computed"] == 8
    assert any("corrupted" in s for s in said)
    after = _all_cached(path)
    assert after.keys() == before.keys()
    for sid in before:
        assert np.array_equal(after[sid][0], before[sid][0])


# ---------------------------------------------------------------------------------------------
# refusals


def test_mismatched_tokenizer_missing_rows_and_changed_tokens_refused(tiny, tiny_cache, tmp_path):
    path, _ = tiny_cache
    feats, tok = _features(tiny, cache_cfg(tiny, tmp_path, path))
    _, other = load_model(str(tiny / "other_student"))
    with pytest.raises(CacheError, match="different tokenizer"):
        CachedTeacher.open(path, other, len(other), feats)
    extra = dict(feats[0], id="never-cached")
    with pytest.raises(CacheError, match="1 of 65 training rows are not in"):
        CachedTeacher.open(path, tok, len(tok), feats + [extra])
    changed, _ = _features(tiny, cache_cfg(tiny, tmp_path, path, data={"system_prompt": "Be brief."}))
    with pytest.raises(CacheError, match="tokenize differently"):
        CachedTeacher.open(path, tok, len(tok), changed)
    with pytest.raises(CacheError, match="vocabulary"):
        CachedTeacher.open(path, tok, 10, feats)
    # through the CLI: one line, exit status 2, before training
    cfg = base_config(tiny, tmp_path / "run", teacher={"model": None, "cache": str(path)},
                      student={"model": str(tiny / "other_student"), "init": None})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cache_only_with_student_init_is_a_clear_error(tiny, tiny_cache, tmp_path, capsys):
    path, _ = tiny_cache
    cfg = base_config(tiny, tmp_path / "run", teacher={"model": None, "cache": str(path)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    assert "student.model: required when the teacher is only a cache" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# end to end


def test_run_from_cache_without_teacher_model(tiny, tiny_cache, tmp_path):
    path, _ = tiny_cache
    out = tmp_path / "run"
    cfg = base_config(tiny, out, teacher={"model": None, "cache": str(path)},
                      student={"model": str(tiny / "student"), "init": None},
                      train={"max_steps": 4, "learning_rate": 3e-3}, eval={"generate": False, "speed_prompts": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert "kl_to_teacher" not in rep["student"]["metrics"] and "perplexity" in rep["student"]["metrics"]
    assert rep["teacher"]["metrics"] == {} and "kl_to_teacher" in rep["unavailable"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "student" / "model.safetensors").exists()


def test_run_from_cache_with_teacher_for_student_and_eval(tiny, tiny_cache, tmp_path, capsys):
    """teacher.model + teacher.cache: the teacher cuts the student and is evaluated, but training
    reads the cache (the teacher model is freed meanwhile)."""
    path, _ = tiny_cache
    out = tmp_path / "run"
    cfg = base_config(tiny, out, teacher={"cache": str(path)}, train={"max_steps": 2},
                      loss={"divergence": "reverse_kl", "temperature": 2.0, "alpha": 0.7},
                      eval={"generate": False, "speed_prompts": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    assert "teacher model freed for training" in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert "kl_to_teacher" in rep["student"]["metrics"] and rep["teacher"]["params"] > 0
    assert "perplexity" in rep["teacher"]["metrics"] and rep["unavailable"] == {}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


def test_cache_refused_for_methods_that_train_on_other_sequences(tiny, tiny_cache, tmp_path):
    from kdistill.errors import ConfigError

    path, _ = tiny_cache
    cfg = load_config(None, [], base=base_config(tiny, tmp_path, method="on_policy", teacher={"cache": str(path)},
                                                 student={"model": str(tiny / "student"), "init": None}))
    with pytest.raises(ConfigError, match="teacher.cache: .*method on_policy trains on other sequences"):
        run(cfg, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cache_stores_teacher_figures_so_cache_only_runs_report_retention(tiny, tiny_cache, tmp_path):
    """cache-teacher evaluates the teacher on data.eval; a run from the cache alone, with the same
    held-out rows and eval settings, reports the teacher's figures and retention; other settings
    get none (never figures measured on something else)."""
    path, stats = tiny_cache
    saved = json.loads((path / "teacher_eval.json").read_text())
    assert stats["teacher_eval"] == saved["metrics"] and "perplexity" in saved["metrics"] and saved["params"] > 0
    out = tmp_path / "run"
    cfg = base_config(tiny, out, teacher={"model": None, "cache": str(path)},
                      student={"model": str(tiny / "student"), "init": None}, train={"max_steps": 2})
    cfg["eval"] = {**cfg["eval"], "speed_prompts": 0}  # same held-out rows, same generate / match settings
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher"]["metrics"] == saved["metrics"] and rep["teacher"]["params"] == saved["params"]
    assert "perplexity" in rep["retention"] and "retention" not in rep.get("unavailable", {})
    assert "kl_to_teacher" in rep["unavailable"]  # still: no teacher logits on held-out rows
    # kdistill eval from the cache alone: the same teacher figures, no traceback
    assert main(["eval", str(tmp_path / "c.yaml")]) == 0
    assert json.loads((out / "report.json").read_text())["teacher"]["metrics"] == saved["metrics"]
