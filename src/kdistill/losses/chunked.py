"""Kept rows and chunked vocabulary projections, shared by every chunked loss.

Labels are aligned with the positions; a position whose label is ``IGNORE_INDEX`` (-100) is never
projected onto the vocabulary. :func:`chunks` walks the kept rows of ``[tokens, hidden]`` hidden
states a few at a time; each :class:`Chunk` projects its rows through the output weight on demand
(``hidden @ weight.T``, ``[chunk, vocab]``, in the weight's dtype), so only one chunk's logits
exist at a time and the caller decides when they are freed. The fused distillation loss
(:mod:`kdistill.losses.distill`) and the label log-probs (:mod:`kdistill.losses.likelihood`) are
both written on it.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Union

import torch

__all__ = ["IGNORE_INDEX", "Chunk", "auto_chunk_size", "chunks", "kept_rows", "project"]

IGNORE_INDEX = -100


def kept_rows(labels: torch.Tensor) -> torch.Tensor:
    """Indices ``[kept]`` (long) of the positions of ``labels`` ``[tokens]`` that are not ``IGNORE_INDEX``."""
    return (labels != IGNORE_INDEX).nonzero().squeeze(-1)


def _count(mask: torch.Tensor, num_items: Optional[Union[int, torch.Tensor]]) -> torch.Tensor:
    """Float32 scalar: ``num_items`` when given, else the number of true entries of ``mask``."""
    if num_items is None:
        return mask.sum().float()
    return torch.as_tensor(num_items, dtype=torch.float32, device=mask.device)


def auto_chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk for ``chunk_size="auto"`` (:func:`~kdistill.losses.fused_distill_loss`,
    :func:`~kdistill.losses.label_logprobs`).

    A ``[chunk, vocab]`` block holds about as many values as the ``[tokens, hidden]`` hidden states
    (Liger-Kernel's rule: the loss never needs much more memory than its input), but at least 2²⁴
    (64 MB of float32) so the matmuls stay efficient; rounded down to a power of two.
    """
    rows = max(tokens * hidden, 1 << 24) // max(vocab, 1)
    rows = 1 << max(int(rows).bit_length() - 1, 0)
    return max(1, min(rows, tokens))


def _chunk_size(chunk_size: Union[int, str, None], labels: torch.Tensor, vocab: int, hidden: int) -> int:
    """``chunk_size`` checked, or for ``"auto"``/None :func:`auto_chunk_size` of the kept ``labels`` ``[tokens]``."""
    if chunk_size is None or chunk_size == "auto":
        return auto_chunk_size(max(int((labels != IGNORE_INDEX).sum()), 1), vocab, hidden)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or 'auto', got {chunk_size!r}")
    return chunk_size


def project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[n, H]`` -> logits ``[n, V]`` through ``weight`` ``[V, H]``, in the weight's dtype.

    Hidden states from an autocast forward may be narrower than the weight: they are cast to it
    first. Under an active autocast the matmul itself follows autocast, as the model's head would.
    """
    return hidden.to(weight.dtype) @ weight.t()


class Chunk(NamedTuple):
    """A few kept rows: ``span`` (their positions among the kept rows, to index ``[kept, ...]``
    tensors), ``rows`` ``[c]`` (their token indices), ``hidden`` ``[c, H]`` (in the weight's dtype)
    and the ``weight`` ``[V, H]`` to project them with."""

    span: slice
    rows: torch.Tensor
    hidden: torch.Tensor
    weight: torch.Tensor

    def logits(self) -> torch.Tensor:
        """``[c, V]`` in the weight's dtype, computed on each call and never kept by the chunk."""
        return project(self.hidden, self.weight)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """This chunk's rows of a per-token tensor ``[tokens, ...]`` -> ``[c, ...]``."""
        return x.index_select(0, self.rows)


def chunks(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, chunk_size: int) -> Iterator[Chunk]:
    """Walk ``rows`` ``[kept]`` (indices into ``hidden`` ``[tokens, H]``) ``chunk_size`` at a time."""
    for start in range(0, rows.numel(), chunk_size):
        r = rows[start : start + chunk_size]
        yield Chunk(slice(start, start + r.numel()), r, hidden.index_select(0, r).to(weight.dtype), weight)
