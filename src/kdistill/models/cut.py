"""Students cut from a teacher by depth: keep a subset of its decoder blocks.

* :func:`select_layers` — which blocks to keep (uniform, first, last, first_last, importance, a list);
* :func:`layer_importance` — "Block Influence": how much each block changes its input
  (1 − cosine similarity of the block's input and output hidden states), on sample rows;
* :func:`cut_student` — a copy of the teacher with only the kept blocks, their teacher indices
  recorded in ``config.kdistill_teacher_layers``.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from kdistill.errors import ModelError
from kdistill.models.introspect import decoder_layers


def select_layers(n_total: int, n_keep: int, how, importance: Optional[Sequence[float]] = None) -> list[int]:
    """Indices of the teacher blocks a student keeps (sorted).

    ``how``: ``uniform`` (evenly spaced, first and last included), ``first``, ``last``,
    ``first_last`` (the first n−n//3 and the last n//3 blocks), ``importance`` (the ``n_keep``
    highest-scoring blocks), or an explicit list of indices.
    """
    if isinstance(how, (list, tuple)):
        idx = sorted(set(int(i) for i in how))
        bad = [i for i in idx if not 0 <= i < n_total]
        if bad:
            raise ModelError(f"student.init.layer_selection: indices {bad} out of range 0..{n_total - 1}")
        if not idx:
            raise ModelError("student.init.layer_selection: empty list of layers")
        return idx
    if not 1 <= n_keep <= n_total:
        raise ModelError(f"student.init.num_layers: must be between 1 and the teacher's {n_total} layers, got {n_keep}")
    if how == "uniform":
        if n_keep == 1:
            return [0]
        return sorted(set(round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)))
    if how == "first":
        return list(range(n_keep))
    if how == "last":
        return list(range(n_total - n_keep, n_total))
    if how == "first_last":
        tail = n_keep // 3
        return list(range(n_keep - tail)) + list(range(n_total - tail, n_total))
    if how == "importance":
        if importance is None:
            raise ValueError("importance scores are required for layer_selection=importance")
        order = sorted(range(n_total), key=lambda i: -importance[i])
        return sorted(order[:n_keep])
    raise ModelError(f"student.init.layer_selection: unknown value {how!r}")


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Sequence[dict]) -> list[float]:
    """Block Influence per decoder block: mean over tokens of 1 − cos(h_in, h_out).

    Args:
        batches: dicts with ``input_ids`` and ``attention_mask`` ``[batch, seq]``.
    Returns:
        one float per block; higher = the block changes its input more = keep it.
    """
    n = len(decoder_layers(model))
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        hs = out.hidden_states  # n+1 tensors [batch, seq, hidden]; the last has the final norm applied
        m = b["attention_mask"].bool()
        for i in range(n):
            h_in, h_out = hs[i][m].float(), hs[i + 1][m].float()
            sums[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum().double()
        count += int(m.sum())
    return (sums / max(count, 1)).tolist()


def cut_student(teacher: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A deep copy of ``teacher`` with only the decoder blocks in ``keep`` (in order).

    The kept indices are recorded in ``config.kdistill_teacher_layers``.
    """
    student = copy.deepcopy(teacher)
    layers = decoder_layers(student)
    kept = nn.ModuleList([layers[i] for i in keep])
    decoder = student.get_decoder() if hasattr(student, "get_decoder") else student.model
    if hasattr(decoder, "layers"):
        decoder.layers = kept
    else:
        decoder.h = kept
    for new_idx, block in enumerate(kept):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = student.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, attr) and isinstance(getattr(cfg, attr), int):
            setattr(cfg, attr, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.kdistill_teacher_layers = [int(i) for i in keep]
    return student


