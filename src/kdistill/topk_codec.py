"""The teacher cache's codecs: a shard's top-k ids and log-probs <-> compact named arrays.

Two formats, both read forever (:mod:`kdistill.topk_cache` picks one by the manifest's version):

**Version 1** (:func:`encode_topk` / :func:`decode_topk`): ids as byte planes, log-probs on a
uniform grid of ``1/256`` nats below the top-1, delta-coded; the shard is ``np.savez_compressed``
(zlib). About 2.7 bytes per kept entry.

**Version 2** (:func:`encode_shard_v2` / :func:`decode_shard_v2`), about half of that. Three ideas:

* *Log-probs on a companded grid.* The distance below the top-1, ``b = top1 − lp ≥ 0``, is
  quantized uniformly in ``u = knee·log(1 + b/knee)``: steps of ``1/scale`` nats near the top-1,
  growing in proportion to ``b`` in the tail, where an entry's probability (its weight in every
  divergence) is small. ``top1`` and the tail mass ``log(1 − Σ top-k)`` are kept (float16 / a
  1/2048-nat grid), and decoding moves entries 2..k, each within its own rounding interval and
  mostly the heavy ones, so that the tail mass is the stored one again (see :func:`_restore_tail_within`).
  ``scale`` and ``knee`` are stored per shard, so shards written with other values still read.
* *Ties are sets.* Entries whose quantized log-probs are equal carry the same value after decoding,
  so their order is free: it is made canonical (by id code), which costs nothing in accuracy and
  makes the id codes cheaper.
* *Ids coded against their context.* The context of a position is the token the teacher read there
  (``ctx``, stored). An id is coded by when it was first seen *with that context* in this shard:
  code 0 = new (the id is read from a table of first appearances, in order), code ``n`` = the
  ``n``-th distinct id seen with this context so far. Positions after the same token (the same
  word, template, punctuation) share most of their top-k, so codes are small numbers. Decoding is
  a few vectorized numpy passes over the shard (no per-position Python loop).

Every stream is stored as its own LZMA-compressed byte array (multi-byte integers as byte planes),
so the shard stays a dict of named arrays: arrays other code adds next to these are kept as they are.
"""

from __future__ import annotations

import lzma
from typing import Optional

import numpy as np

LOGPROB_SCALE = 256  # version 1: grid of log-probs below top-1, 1/256 nats (max rounding error 0.002 nats)
_QMAX = 65535

V2_SCALE = 128  # version 2: finest step 1/128 nats (right below the top-1) ...
V2_KNEE = 0.75  # ... growing like (1 + b/knee) with the distance b below it
_CODE_ESC = 255  # a code >= 255 is stored as 255 in `codes` and in full in `codes_hi`
_DU_ESC = 255
_TOP1_SCALE = 4096.0  # version 2: −top1·4096 as float16 (relative precision 1e-3; normal down to p1 = 1 − 1.5e-8)
_REST_SCALE = 2048.0  # version 2: −log(tail mass) on a grid of 1/2048 nats (uint16: down to e^-32)


# ---------------------------------------------------------------------------------------------
# version 1


def id_bytes(vocab_size: int) -> int:
    """Bytes per stored token id: 2 up to 65,536 tokens, 3 up to 2^24, else 4."""
    return 2 if vocab_size <= 1 << 16 else 3 if vocab_size <= 1 << 24 else 4


def tail_log_mass(logprobs: np.ndarray) -> np.ndarray:
    """``[T]`` log of ``1 − Σ exp(logprobs)`` over the last axis, in float64 (−inf when nothing is left)."""
    with np.errstate(divide="ignore"):
        return np.log(np.clip(1.0 - np.exp(np.asarray(logprobs, np.float64)).sum(-1), 0.0, None))


def encode_topk(indices: np.ndarray, logprobs: np.ndarray, vocab_size: int, log_rest: Optional[np.ndarray] = None,
                scale: int = LOGPROB_SCALE) -> dict:
    """Version 1: compact arrays for ``T`` positions.

    Args:
        indices: ``[T, k]`` token ids, ``logprobs``: ``[T, k]`` float, each row sorted descending.
        log_rest: ``[T]`` log of the mass outside the top-k (default: ``log(1 − Σ exp(logprobs))``).
    Returns:
        ``{"ids": [B, T, k] uint8, "top1": [T] float32, "gaps": [2, T, k-1] uint8, "log_rest": [T] float32}``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    T, k = indices.shape
    nb = id_bytes(vocab_size)
    ids = indices.astype("<u4").view(np.uint8).reshape(T, k, 4)[..., :nb]
    ids = np.ascontiguousarray(ids.transpose(2, 0, 1))
    top1 = lp[:, 0].astype(np.float32)
    below = top1.astype(np.float64)[:, None] - lp[:, 1:]
    below = np.where(np.isfinite(below), below, np.inf)
    q = np.clip(np.round(below * scale), 0, _QMAX)
    q = np.maximum.accumulate(q, axis=1).astype(np.int64)  # sorted input: already monotone; guard anyway
    d = np.diff(np.concatenate([np.zeros((T, 1), np.int64), q], axis=1), axis=1).astype("<u2")
    gaps = np.ascontiguousarray(d.view(np.uint8).reshape(T, k - 1, 2).transpose(2, 0, 1))
    if log_rest is None:
        log_rest = tail_log_mass(lp)
    return {"ids": ids, "top1": top1, "gaps": gaps, "log_rest": np.asarray(log_rest, np.float32)}


def _restore_tail(lp64: np.ndarray, log_rest, max_shift: float) -> np.ndarray:
    """Shift log-probs 2..k of ``lp64`` ``[T, k]`` (float64, in place) by one amount per row, at most
    ``max_shift``, so that ``1 − Σ top-k`` is ``exp(log_rest)`` again."""
    if log_rest is None or lp64.shape[1] < 2:
        return lp64
    others = np.exp(lp64[:, 1:]).sum(1)
    want = 1.0 - np.exp(np.asarray(log_rest, np.float64)) - np.exp(lp64[:, 0])
    ok = (want > 0) & (others > 0)
    shift = np.zeros(lp64.shape[0])
    shift[ok] = np.log(want[ok] / others[ok])
    # never move an entry by more than the grid (guards against a tail that float32 cannot resolve)
    lp64[:, 1:] += np.clip(shift, -max_shift, max_shift)[:, None]
    return lp64


def decode_topk(ids: np.ndarray, top1: np.ndarray, gaps: np.ndarray, log_rest: Optional[np.ndarray] = None,
                scale: int = LOGPROB_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_topk` (for a slice of positions): ``([T, k] int64, [T, k] float32)``.

    With ``log_rest``, log-probs 2..k are shifted by a common amount so that ``1 − Σ top-k`` is the
    stored tail mass (see :mod:`kdistill.topk_cache`).
    """
    nb, T, k = ids.shape
    raw = np.zeros((T, k, 4), np.uint8)
    raw[..., :nb] = ids.transpose(1, 2, 0)
    indices = raw.view("<u4").reshape(T, k).astype(np.int64)
    d = np.ascontiguousarray(gaps.transpose(1, 2, 0)).view("<u2").reshape(T, k - 1).astype(np.int64)
    q = np.cumsum(d, axis=1)
    lp64 = np.empty((T, k), np.float64)
    lp64[:, 0] = top1
    lp64[:, 1:] = top1.astype(np.float64)[:, None] - q / scale
    _restore_tail(lp64, log_rest, 1.0 / scale)
    return indices, lp64.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# version 2: byte streams


def pack(a: np.ndarray) -> np.ndarray:
    """A 1-D array of fixed-size little-endian numbers -> LZMA-compressed byte planes (``uint8`` array)."""
    a = np.ascontiguousarray(a)
    planes = a.view(np.uint8).reshape(-1, a.dtype.itemsize).T.tobytes() if a.size else b""
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                "dict_size": max(1 << 16, min(len(planes), 1 << 24))}]
    return np.frombuffer(lzma.compress(planes, format=lzma.FORMAT_RAW, filters=filters), np.uint8)


def unpack(blob: np.ndarray, dtype: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``n`` numbers of ``dtype`` (little-endian)."""
    dt = np.dtype(dtype)
    raw = lzma.decompress(np.asarray(blob, np.uint8).tobytes(), format=lzma.FORMAT_RAW,
                          filters=[{"id": lzma.FILTER_LZMA2}]) if n else b""
    if len(raw) != n * dt.itemsize:
        raise ValueError(f"stream holds {len(raw)} bytes, expected {n} x {dt.itemsize}")
    return np.frombuffer(raw, np.uint8).reshape(dt.itemsize, n).T.copy().view(dt).reshape(n)


def _ids_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


# ---------------------------------------------------------------------------------------------
# version 2: codec


def quantize_below(below: np.ndarray, scale: int = V2_SCALE, knee: float = V2_KNEE) -> np.ndarray:
    """Distances below the top-1 ``[T, k-1]`` (nats, ascending along a row) -> grid steps (int64, non-decreasing)."""
    with np.errstate(over="ignore", invalid="ignore"):
        u = np.round(np.log1p(np.where(np.isfinite(below), below, np.inf) / knee) * knee * scale)
    u = np.nan_to_num(u, nan=0.0, posinf=float(1 << 40))
    return np.maximum.accumulate(np.clip(u, 0, 1 << 40), axis=1).astype(np.int64)


def dequantize_below(u: np.ndarray, scale: int = V2_SCALE, knee: float = V2_KNEE) -> np.ndarray:
    """Inverse of :func:`quantize_below` (float64 nats; ``inf`` for the cap)."""
    with np.errstate(over="ignore"):
        return np.expm1(u / (knee * scale)) * knee


def encode_shard_v2(indices: np.ndarray, logprobs: np.ndarray, context: np.ndarray, vocab_size: int,
                    log_rest: Optional[np.ndarray] = None, scale: int = V2_SCALE, knee: float = V2_KNEE) -> dict:
    """Version 2: named byte arrays for one shard's ``T`` positions.

    Args:
        indices, logprobs: ``[T, k]`` top-k ids and log-probs (any order; sorted here).
        context: ``[T]`` the token the teacher read at each position (``input_ids[t]``).
        log_rest: ``[T]`` log tail mass (default: from ``logprobs``, in float64).
    Returns:
        ``{"ctx", "codes", "codes_hi", "table", "steps", "steps_hi", "top1", "log_rest"}``, each a
        ``uint8`` array (see the module docstring).
    """
    idx = np.asarray(indices, np.int64)
    lp = np.asarray(logprobs, np.float64)
    T, k = idx.shape
    order = np.argsort(-lp, axis=1, kind="stable")
    idx, lp = np.take_along_axis(idx, order, 1), np.take_along_axis(lp, order, 1)
    ctx = np.asarray(context, np.int64).reshape(T)
    if log_rest is None:
        log_rest = tail_log_mass(lp)
    u = quantize_below(lp[:, :1] - lp[:, 1:], scale, knee)  # [T, k-1]
    steps = np.diff(np.concatenate([np.zeros((T, 1), np.int64), u], 1), axis=1).ravel()
    tie = np.concatenate([np.full((T, 1), -1, np.int64), u], 1).ravel()  # the top-1 is a group of its own
    pos = np.repeat(np.arange(T), k)
    flat_ids, flat_ctx = idx.ravel(), ctx[pos]
    pair = (flat_ctx << 32) | flat_ids
    # first appearance of each (context, id) pair: a pair occurs at most once per position
    uniq, first, inv = np.unique(pair, return_index=True, return_inverse=True)
    # ordinals within a context, in the order the decoder meets them: (position, tie group, id)
    f_ctx = flat_ctx[first]
    by = np.lexsort((flat_ids[first], tie[first], pos[first], f_ctx))
    ordinal = np.empty(len(uniq), np.int64)
    sorted_ctx = f_ctx[by]
    ordinal[by] = np.arange(len(uniq)) - np.searchsorted(sorted_ctx, sorted_ctx, side="left")
    is_new = np.zeros(T * k, bool)
    is_new[first] = True
    codes = np.where(is_new, 0, ordinal[inv] + 1)
    # canonical order inside each tie group: by code, new entries (code 0, by id) first; then a
    # code is stored as its difference to the previous one in its group (codes ascend there)
    stored = np.lexsort((flat_ids, codes, tie, pos))
    codes, tie_s = codes[stored], (tie + (pos << 41))[stored]
    same = np.zeros(T * k, bool)
    same[1:] = tie_s[1:] == tie_s[:-1]
    prev = np.concatenate([[0], codes[:-1]])
    codes = np.where(same, codes - prev, codes)
    table = flat_ids[first][by]  # ids in (context, ordinal) order
    return {
        "ctx": pack(ctx.astype(_ids_dtype(vocab_size))),
        "codes": pack(np.minimum(codes, _CODE_ESC).astype(np.uint8)),
        "codes_hi": pack(codes[codes >= _CODE_ESC].astype("<u4")),
        "table": pack(table.astype(_ids_dtype(vocab_size))),
        # steps column by column: each rank has its own typical step
        "steps": pack(np.minimum(steps, _DU_ESC).astype(np.uint8).reshape(T, k - 1).T.ravel()),
        "steps_hi": pack(steps[steps >= _DU_ESC].astype("<u8")),
        "top1": pack(np.minimum(-lp[:, 0] * _TOP1_SCALE, 65504).astype("<f2")),
        "log_rest": pack(np.clip(np.nan_to_num(np.round(-np.asarray(log_rest, np.float64).reshape(T) * _REST_SCALE),
                                               posinf=_QMAX), 0, _QMAX).astype("<u2")),
    }


def decode_shard_v2(arrays: dict, T: int, k: int, vocab_size: int, scale: int = V2_SCALE,
                    knee: float = V2_KNEE) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_shard_v2` for a whole shard: ``(ids [T, k] int64, logprobs [T, k] float32)``."""
    if T == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    idt = _ids_dtype(vocab_size)
    ctx = unpack(arrays["ctx"], idt, T).astype(np.int64)
    codes = unpack(arrays["codes"], "u1", T * k).astype(np.int64)
    esc = codes == _CODE_ESC
    codes[esc] = unpack(arrays["codes_hi"], "<u4", int(esc.sum()))
    table = unpack(arrays["table"], idt, int((codes == 0).sum())).astype(np.int64)
    steps = unpack(arrays["steps"], "u1", T * (k - 1)).reshape(k - 1, T).T.ravel().astype(np.int64)
    esc = steps == _DU_ESC
    steps[esc] = unpack(arrays["steps_hi"], "<u8", int(esc.sum()))
    top1 = -unpack(arrays["top1"], "<f2", T).astype(np.float64) / _TOP1_SCALE
    log_rest = -unpack(arrays["log_rest"], "<u2", T).astype(np.float64) / _REST_SCALE
    # codes were stored as differences inside each tie group: a running sum per group restores them
    u = np.cumsum(steps.reshape(T, k - 1), 1)
    tie = np.concatenate([np.full((T, 1), -1, np.int64), u], 1).ravel() + (np.repeat(np.arange(T), k) << 41)
    starts = np.ones(T * k, bool)
    starts[1:] = tie[1:] != tie[:-1]
    run = np.cumsum(codes)
    codes = run - np.maximum.accumulate(np.where(starts, run - codes, 0))
    # ids: new entries take the next table entry of their context, the others their context's n-th entry
    flat_ctx = np.repeat(ctx, k)
    new = np.nonzero(codes == 0)[0]
    nc = flat_ctx[new]
    by = np.argsort(nc, kind="stable")
    sorted_nc = nc[by]
    start = np.searchsorted(sorted_nc, sorted_nc, side="left")
    ordinal = np.empty(len(new), np.int64)
    ordinal[by] = np.arange(len(new)) - start
    contexts, first_row = np.unique(sorted_nc, return_index=True)  # table rows of each context start here
    slot = np.where(codes == 0, 0, codes - 1)
    slot[new] = ordinal
    where = np.searchsorted(contexts, flat_ctx)
    if len(contexts) == 0 or (where >= len(contexts)).any() or (contexts[np.minimum(where, len(contexts) - 1)] != flat_ctx).any():
        raise ValueError("an id code refers to a context with no table")
    ids = table[first_row[where] + slot].reshape(T, k)
    lp64 = np.empty((T, k), np.float64)
    lp64[:, 0] = top1
    lp64[:, 1:] = top1.astype(np.float64)[:, None] - dequantize_below(u, scale, knee)
    # each entry may move within its own rounding interval (half a step, wider in the tail)
    with np.errstate(invalid="ignore"):
        half = dequantize_below(u + 0.5, scale, knee) - dequantize_below(u, scale, knee)
    _restore_tail_within(lp64, log_rest, half)
    return ids, lp64.astype(np.float32)


def _restore_tail_within(lp64: np.ndarray, log_rest: np.ndarray, half: np.ndarray, iters: int = 96) -> np.ndarray:
    """Move log-probs 2..k of ``lp64`` ``[T, k]`` (in place), each within its rounding interval
    ``±half_j``, so that ``1 − Σ top-k`` is ``exp(log_rest)`` again.

    Entry ``j`` moves by ``half_j·clip(a·w_j, −1, 1)`` with ``w_j ∝ p_j·half_j`` and one ``a`` per row
    (found by bisection): the correction lands on the entries that hold the mass and whose own
    rounding is the likely cause (near the top-1), not on the many small tail entries, where a common
    shift would bias every tempered (T > 1) loss."""
    T, k = lp64.shape
    if k < 2:
        return lp64
    half = np.where(np.isfinite(half), half, 0.0)
    want = 1.0 - np.exp(np.asarray(log_rest, np.float64)) - np.exp(lp64[:, 0])
    base = lp64[:, 1:]
    w = np.exp(base) * half
    w = w / np.maximum(w.max(1, keepdims=True), 1e-300)
    ok = (want > 0) & (w > 0).any(1)
    lo, hi = np.full(T, -1e12), np.full(T, 1e12)
    for _ in range(iters):  # Σ exp(base + shift(a)) is non-decreasing in a
        a = 0.5 * (lo + hi)
        low = np.exp(base + half * np.clip(a[:, None] * w, -1.0, 1.0)).sum(1) < want
        lo, hi = np.where(low, a, lo), np.where(low, hi, a)
    shift = half * np.clip(0.5 * (lo + hi)[:, None] * w, -1.0, 1.0)
    lp64[:, 1:] = np.where(ok[:, None], base + shift, base)
    return lp64
