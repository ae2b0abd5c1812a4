"""Teacher cache format version 2 (issue 17): the codec's round trip, old (version 1) caches still
read and resumed, and the losses' tail bucket precise enough for a confident teacher."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from conftest import base_config
from kdistill.commands.cache_teacher import cache_teacher
from kdistill.config import load_config
from kdistill.losses import TopK
from kdistill.losses.topk import _topk_bins
from kdistill.teachers.cache import CachedTeacher
from kdistill.topk_cache import FORMAT, TopKCache, _sha256, write_manifest
from kdistill.topk_codec import (decode_shard_v2, dequantize_below, encode_shard_v2, encode_topk, quantize_below,
                                 tail_log_mass)


def _teacher_like(T: int, k: int, vocab: int, seed: int = 0, contexts: int = 12):
    """``(ids [T, k], logprobs [T, k] float32 sorted descending, context [T])``: positions after the
    same token share most of their top-k (as a real teacher's do); every fifth one is confident."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, contexts, T)
    base = {c: rng.choice(vocab, 3 * k, replace=False) for c in range(contexts)}
    ids = np.empty((T, k), np.int64)
    lp = np.empty((T, k))
    for t in range(T):
        pool = np.unique(np.concatenate([base[ctx[t]][rng.random(3 * k) > 0.2], rng.choice(vocab, k)]))
        z = rng.normal(0, 3, len(pool))
        z[0] += 16 if t % 5 == 0 else 0
        order = np.argsort(-z)[:k]
        ids[t] = pool[order]
        lp[t] = z[order] - np.log(np.exp(z).sum() + 50.0)  # 50: mass outside the pool
    return ids, lp.astype(np.float32), ctx


def test_v2_round_trip_sets_values_tail_and_size():
    T, k, V = 600, 32, 49152
    ids, lp, ctx = _teacher_like(T, k, V)
    enc = encode_shard_v2(ids, lp, ctx, V)
    assert all(a.dtype == np.uint8 and a.ndim == 1 for a in enc.values())
    di, dl = decode_shard_v2(enc, T, k, V)
    assert di.shape == (T, k) and dl.dtype == np.float32
    # the same set of ids per position, the top-1 first, values ordered
    assert (np.sort(di, 1) == np.sort(ids, 1)).all() and (di[:, 0] == ids[:, 0]).all()
    assert (np.diff(dl[:, 1:], axis=1) <= 1e-6).all()  # (the tail fix may lift entry 2 a little above the top-1)
    # each id keeps its log-prob within its rounding interval (one step, the tail fix included)
    u = quantize_below(lp[:, :1].astype(np.float64) - lp[:, 1:])
    step = dequantize_below(u + 1) - dequantize_below(u)
    for t in range(T):
        orig = dict(zip(ids[t].tolist(), lp[t].tolist()))
        tol = dict(zip(ids[t, 1:].tolist(), step[t].tolist()))
        tol[int(ids[t, 0])] = 0.0
        for i, v in zip(di[t].tolist(), dl[t].tolist()):
            assert abs(v - orig[i]) <= tol[i] + 1e-3 * abs(lp[t, 0]) + 1e-5
    # the tail mass 1 - sum(top-k) is restored (relative 1e-3; the float32 cast is the limit)
    want, got = np.exp(tail_log_mass(lp)), np.exp(tail_log_mass(dl))
    assert np.allclose(got, want, rtol=2e-3, atol=1e-9)
    # coded against the context, much smaller than the version-1 codec (both LZMA'd / zlib'd)
    v2 = sum(a.nbytes for a in enc.values())
    buf = io.BytesIO()
    np.savez_compressed(buf, **encode_topk(ids, lp, V))
    assert v2 < 0.75 * len(buf.getvalue())


def test_v2_tail_fix_spares_the_tempered_mass():
    """Restoring 1 − Σ top-k moves the heavy entries, not the whole tail together: the T = 2
    partition Σ p^(1/2) (top-k and rest bucket) stays within 2.5e-3 of the original in every row
    (shifting every entry by a common fraction of its step, as before, gave 4.5e-3 here)."""
    T, k, V = 600, 32, 49152
    ids, lp, ctx = _teacher_like(T, k, V)
    di, dl = decode_shard_v2(encode_shard_v2(ids, lp, ctx, V), T, k, V)

    def z2(l):
        l = l.astype(np.float64)
        return np.exp(l / 2).sum(1) + np.exp(tail_log_mass(l) / 2)

    assert np.abs(z2(dl) / z2(lp) - 1).max() < 2.5e-3


def test_v2_edge_cases_large_vocab_k1_empty_and_masked():
    V = 70_000  # ids above 65535: stored as uint32
    ids, lp, ctx = _teacher_like(50, 8, V, seed=1)
    ids[:, 1] = V - 1 - np.arange(50)  # large ids
    lp[:, 1:] = np.sort(lp[:, 1:], axis=1)[:, ::-1]
    lp[3, -2:] = -np.inf  # a masked vocabulary: -inf log-probs
    di, dl = decode_shard_v2(encode_shard_v2(ids, lp, ctx, V), 50, 8, V)
    assert (np.sort(di, 1) == np.sort(ids, 1)).all()
    assert np.isneginf(dl[3, -2:]).all() and np.isfinite(dl[3, :-2]).all()
    one_i, one_l = decode_shard_v2(encode_shard_v2(ids[:, :1], lp[:, :1], ctx, V), 50, 1, V)
    assert (one_i[:, 0] == ids[:, 0]).all() and np.allclose(one_l[:, 0], lp[:, 0], rtol=1e-3)
    e_i, e_l = decode_shard_v2(encode_shard_v2(ids[:0], lp[:0], ctx[:0], V), 0, 8, V)
    assert e_i.shape == (0, 8) and e_l.shape == (0, 8)


def test_tail_bucket_of_a_confident_teacher_is_precise_in_float32():
    """Σ top-k = 1 − 1e-6: the loss's rest bucket must hold log(1e-6) to ~1e-3, not ~6%."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 400, generator=g, dtype=torch.float64)
    z[:, 0] += 20.0
    full = torch.log_softmax(z, -1)
    top = full.topk(16, -1)
    rest64 = torch.log1p(-top.values.exp().sum(-1))  # float64 truth
    t_bins, _, _ = _topk_bins(torch.zeros(64, 400), TopK(top.indices, top.values.float()), 1.0)
    rest32 = torch.logsumexp(t_bins[:, -1:], -1)  # the rest bin (bins are already normalized)
    exact32 = torch.log1p(-top.values.float().double().exp().sum(-1))  # what the float32 values imply
    assert (rest32.double() - exact32).abs().max() < 1e-3
    assert (exact32 - rest64).abs().max() < 0.1  # the float32 values themselves hold the tail to ~0.1 nat


# ---------------------------------------------------------------------------------------------
# version 1 caches: still read, and resumed with version-2 shards


def _write_v1_cache(path, cfg, tok, feats, V, k):
    """A cache exactly as kdistill wrote it before version 2 (manifest version 1, zlib'd byte planes)."""
    from kdistill.models import load_model
    from kdistill.data import collate
    from kdistill.models.vocab import tokenizer_fingerprint
    from kdistill.teachers.local import model_topk
    from kdistill.topk_cache import cached_positions, token_hash

    teacher, _ = load_model(cfg.teacher.model, with_tokenizer=False)
    path.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": 1, "teacher": cfg.teacher.model,
                "tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_size": V, "top_k": k, "id_bytes": 2,
                "logprob_scale": 256, "data": {"max_length": cfg.data.max_length, "system_prompt": None,
                                               "chat_template": True}, "shards": [], "next_shard": 0}
    part = feats[:24]
    i, l = model_topk(teacher, collate(part, tok.pad_token_id), V, k)
    buf = io.BytesIO()
    counts = [cached_positions(f) for f in part]
    np.savez_compressed(buf, sample_ids=np.asarray([f["id"].encode() for f in part], dtype=np.bytes_),
                        token_hash=np.asarray([token_hash(f).encode() for f in part], dtype=np.bytes_),
                        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                        **encode_topk(i.numpy(), l.numpy(), V))
    data = buf.getvalue()
    (path / "shard-00000.npz").write_bytes(data)
    manifest["shards"].append({"file": "shard-00000.npz", "sha256": _sha256(data), "bytes": len(data),
                               "samples": len(part), "tokens": int(sum(counts))})
    manifest["next_shard"] = 1
    write_manifest(path, manifest)
    return i.numpy(), l.numpy()


def test_version_1_cache_is_read_and_resumed_with_version_2_shards(tiny, tmp_path):
    from kdistill.data import encode_examples, load_examples, renderer_for
    from kdistill.models import load_model

    path = tmp_path / "old-cache"
    k = 8
    cfg = load_config(None, [], base=base_config(tiny, tmp_path / "run", teacher={"model": str(tiny / "teacher")},
                                                 cache={"path": str(path), "top_k": k, "shard_size": 16}))
    _, tok = load_model(str(tiny / "teacher"), with_tokenizer=True)
    feats, _ = encode_examples(renderer_for(cfg, tok), load_examples(tiny / "train.jsonl"))
    V = len(tok)
    i, l = _write_v1_cache(path, cfg, tok, feats, V, k)
    old = TopKCache(path)
    assert len(old) == 24
    got_i = np.concatenate([old.get(f["id"])[0] for f in feats[:24]])
    got_l = np.concatenate([old.get(f["id"])[1] for f in feats[:24]])
    assert (got_i == i).all() and np.abs(got_l - l).max() < 1.5 / 256 + 1e-5
    # resumed: the 40 missing rows are cached with codec 2 next to the version-1 shard
    stats = cache_teacher(cfg, say=lambda m: None, progress=False)
    assert stats["rows_computed"] == len(feats) - 24
    m = json.loads((path / "manifest.json").read_text())
    assert m["version"] == 2 and [e.get("codec", 1) for e in m["shards"]] == [1, 2, 2, 2]
    teacher = CachedTeacher.open(path, tok, V, feats)
    from kdistill.data import collate
    batch = collate(feats[16:40], tok.pad_token_id)  # rows from both codecs in one batch
    sig = teacher.signal(batch).topk
    keep = batch["labels"] != -100
    assert torch.isfinite(sig.logprobs[keep]).all() and (sig.logprobs[keep] <= 0).all()
    assert float(sig.logprobs[keep].exp().sum(-1).max()) <= 1.0 + 1e-5
    ids16 = sorted(set(f["id"] for f in feats[16:24]))  # served from the version-1 shard, as before
    assert all((teacher.cache.get(r)[0] == old.get(r)[0]).all() for r in ids16)


def test_unknown_future_version_is_one_line(tmp_path):
    from kdistill.topk_cache import CacheError

    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "version": 9}))
    with pytest.raises(CacheError, match="version 9.*reads versions 1, 2"):
        TopKCache(tmp_path)
