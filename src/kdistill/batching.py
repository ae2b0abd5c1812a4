"""Batches without compute spent on padding: length-grouped schedules, packed rows, the padding share.

``train.batching`` chooses how a micro-batch's rows become tensors:

* ``shuffle``: a seeded shuffle, rows right-padded to the longest of their micro-batch (the
  trainer's ``_epoch_batches``);
* ``length_grouped`` (default): the same seeded shuffle, then within windows of 64 micro-batches the
  rows are sorted by length and cut into micro-batches, whose order is shuffled again (the one with
  the most padded positions first, so that running out of memory shows at step 1). Rows of similar
  length share a micro-batch, so little is padded. The schedule depends only on
  ``(lengths, batch_size, seed, epoch)``: a resumed run and every process of a multi-process run
  see exactly the same micro-batches;
* ``packed``: the shuffled micro-batches (the same rows as ``shuffle``), each packed into rows of one
  width (first fit, longest first; :func:`pack_rows` picks the width: no padding at all with
  flash-attention, else a trade of padding against a dense kernel's attention). The rows of one
  packed row are kept apart by *per-sequence positions*: the batch's ``attention_mask`` holds each
  token's sequence number within its row (1, 2, ...; 0 = padding), and
  :func:`kdistill.models.introspect.forward_inputs` turns that into ``position_ids`` that restart at
  every sequence, with no 2-D mask. transformers then keeps the sequences apart in attention: on
  GPU with ``attn_implementation="flash_attention_2"`` through flash-attention's variable-length
  kernel (no padding, no cross-sequence work at all); on CPU (``sdpa`` or ``eager``) through a
  block-diagonal causal mask on a dense kernel (no padded rows; attention still spans the packed
  row, a small share of a small model's FLOPs at these lengths). :func:`check_packing` verifies on
  the model itself, before training, that a packed forward equals the plain one.

Labels stay aligned within each sequence (the last token of a sequence has label -100), so the
loss of a packed micro-batch equals the loss of the same rows padded (tested).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

from kdistill.data import IGNORE_INDEX, collate
from kdistill.models.introspect import forward_inputs

BATCHINGS = ("shuffle", "length_grouped", "packed")
GROUP_WINDOW = 64  # micro-batches whose rows are sorted by length together


def row_length(feature: dict) -> int:
    """Tokens of an encoded row (for a pair of rows, e.g. DPO's chosen/rejected: the longer one)."""
    if "input_ids" in feature:
        return len(feature["input_ids"])
    return max((len(v["input_ids"]) for v in feature.values() if isinstance(v, dict) and "input_ids" in v), default=0)


@functools.lru_cache(maxsize=4)
def _grouped(lengths: tuple, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = GROUP_WINDOW * batch_size
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        rows = sorted(order[w : w + window], key=lambda r: -lengths[r])  # stable: ties keep the shuffle
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    batches = [batches[i] for i in perm]
    widest = max(range(len(batches)), key=lambda i: len(batches[i]) * max(lengths[r] for r in batches[i]))
    batches.insert(0, batches.pop(widest))
    return batches


def grouped_schedule(features: Sequence[dict], batch_size: int, seed: int) -> Callable[[int], list[list[int]]]:
    """``epoch -> row indices of each micro-batch`` (length-grouped, seeded); as many micro-batches
    per epoch as a plain shuffle (``ceil(rows / batch_size)``), every row once per epoch."""
    lengths = tuple(row_length(f) for f in features)
    return lambda epoch: _grouped(lengths, batch_size, seed, epoch)


def padding_counts(batch: dict) -> tuple[int, int]:
    """``(real tokens, positions)`` of a batch's ``attention_mask`` ``[rows, width]`` (0 = padding)."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return 0, 0
    return int((mask != 0).sum()), int(mask.numel())


# ---------------------------------------------------------------------------------------------
# packing


def _first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of at most ``width`` tokens: first fit, longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(width - lengths[i])
    return bins


def pack_rows(features: list[dict], pad_id: int, attention_cost: float = 0.0) -> dict:
    """Pack encoded rows into packed rows of one width (first fit, longest first).

    The width (from the longest row up to all tokens in one row, in steps of an eighth of the longest) minimizes
    ``rows·width·(1 + attention_cost·width)``: positions, plus attention's quadratic term on a dense
    kernel (``attention_cost`` ≈ 1/(6·hidden size); 0 for a variable-length kernel, for which only
    padding counts), the narrowest on ties.

    Returns the :func:`~kdistill.data.collate` keys: ``input_ids``/``labels`` ``[rows, width]``
    (labels aligned within each sequence, -100 at its last token), ``attention_mask`` with each
    token's sequence number in its row (1, 2, ...; 0 = padding), ``ids`` (sample ids in the order of
    ``features``) and ``segments`` ``[len(features), 3]`` long: (row, start, length) of each.
    """
    lengths = [len(f["input_ids"]) for f in features]
    longest, total = max(lengths), sum(lengths)
    widths = sorted({total, *range(longest, total, max(1, longest // 8))})

    def cost(w: int, bins: list[list[int]]) -> float:
        width = max(sum(lengths[i] for i in m) for m in bins)
        return len(bins) * width * (1 + attention_cost * width)

    best = min(((cost(w, b), w, b) for w in widths for b in [_first_fit(lengths, w)]), key=lambda x: (x[0], x[1]))
    bins = best[2]
    width = max(sum(lengths[i] for i in m) for m in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(bins), width), dtype=torch.long)
    segments = torch.zeros((len(features), 3), dtype=torch.long)
    for row, members in enumerate(bins):
        at = 0
        for n, i in enumerate(members, start=1):
            f, k = features[i], lengths[i]
            ids[row, at : at + k] = torch.tensor(f["input_ids"])
            labels[row, at : at + k - 1] = torch.tensor(f["labels"][1:])
            mask[row, at : at + k] = n
            segments[i] = torch.tensor([row, at, k])
            at += k
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "ids": [f.get("id") for f in features],
            "segments": segments}


def attention_cost(model) -> float:
    """:func:`pack_rows`'s ``attention_cost`` for ``model``: 0 with flash-attention (variable-length
    kernel), else about 1/(6·hidden size) (a dense kernel spans the whole packed row)."""
    cfg = getattr(model, "config", None)
    if "flash" in str(getattr(cfg, "_attn_implementation", "")):
        return 0.0
    return 1.0 / (6 * int(getattr(cfg, "hidden_size", 512) or 512))


def make_collate(batching: str, pad_id: int, model=None) -> Callable[[list[dict]], dict]:
    """The trainer's collate function for ``train.batching`` (``model``: the student, for packing)."""
    if batching == "packed":
        cost = attention_cost(model) if model is not None else 0.0
        return lambda rows: pack_rows(rows, pad_id, cost)
    return lambda rows: collate(rows, pad_id)


@torch.no_grad()
def check_packing(model, key: str = "train.batching") -> Optional[str]:
    """None when ``model`` keeps packed sequences apart (a packed forward of two short sequences
    equals their plain forwards), else one line saying why packing cannot be used with it."""
    p = next(model.parameters())
    vocab = int(model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (5,), generator=g), torch.randint(0, vocab, (7,), generator=g)
    was = model.training
    model.eval()
    try:
        def out(ids, mask):
            kw = forward_inputs(ids.to(p.device), mask.to(p.device))
            return model(**kw, use_cache=False).logits.float()

        plain = torch.cat([out(a[None], torch.ones(1, 5, dtype=torch.long))[0],
                           out(b[None], torch.ones(1, 7, dtype=torch.long))[0]])
        packed = out(torch.cat([a, b])[None], torch.tensor([[1] * 5 + [2] * 7]))[0]
    except Exception as exc:  # noqa: BLE001 - any failure means: not with this model
        return f"{key}: packed: this model cannot run packed rows ({type(exc).__name__}: {exc}); use length_grouped"
    finally:
        model.train(was)
    tol = 1e-3 if p.dtype == torch.float32 else 5e-2
    err = float((packed - plain).abs().max() / plain.abs().max().clamp(min=1e-6))
    if err > tol:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        return (f"{key}: packed: {type(model).__name__} with attention {impl!r} mixes packed sequences (relative "
                f"difference {err:.1e} against separate rows); use length_grouped")
    return None


def packing_refusal(method, teacher, student, key: str = "train.batching") -> Optional[str]:
    """None when ``method`` (single-pass, ``packs``), ``teacher`` (``packs``) and the models can train on
    packed rows; else the one line that says which of them cannot."""
    if not getattr(method, "single_pass", True):
        return f"{key}: packed applies to single-pass methods; method {method.name} trains in stages (use length_grouped)"
    if not getattr(method, "packs", False):
        return f"{key}: packed: method {method.name} does not train on packed rows (use length_grouped)"
    if teacher is not None and not getattr(teacher, "packs", False):
        return f"{key}: packed: {teacher.what} scores each row on its own (use length_grouped)"
    for m in (student, getattr(teacher, "model", None)):
        why = check_packing(m, key) if m is not None else None
        if why:
            return why
    return None
