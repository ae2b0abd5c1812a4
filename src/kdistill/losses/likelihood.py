"""Log-likelihood of the labels: chunked label log-probs (SFT, DPO, scoring) and a plain cross-entropy sum."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from kdistill.losses.chunked import IGNORE_INDEX, _chunk_size, chunks, kept_rows

__all__ = ["cross_entropy_sum", "label_logprobs"]


class _LabelLogprobs(torch.autograd.Function):
    """Chunked ``log softmax(hidden @ weight.T)[label]``; the backward recomputes each chunk's logits.

    Inputs: ``hidden`` ``[tokens, H]``, ``weight`` ``[V, H]``, ``labels`` ``[tokens]``; output
    ``[tokens]`` float32. The output is a vector (its upstream gradient is not known in the forward
    pass), so unlike the fused distillation loss the gradient cannot be formed ahead: the forward
    keeps only the per-row log-normalizers ``[kept]``, and the backward projects each chunk again
    and applies ``d log p(y) / d logits = onehot(y) − softmax``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int):
        with torch.autocast(hidden.device.type, enabled=False):  # the backward recomputes in the same dtype
            rows = kept_rows(labels)
            out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
            lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
            for c in chunks(hidden, weight, rows, chunk_size):
                logits = c.logits().float()
                lse[c.span] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, c.select(labels).unsqueeze(1)).squeeze(1)
                out.index_copy_(0, c.rows, picked - lse[c.span])
                del logits
            ctx.save_for_backward(hidden, weight, labels, rows, lse)
            ctx.chunk_size = chunk_size
            return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, rows, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_all = grad_out.float()
        for c in chunks(hidden, weight, rows, ctx.chunk_size):
            g = c.select(g_all)
            d = torch.exp(c.logits().float() - lse[c.span].unsqueeze(1))  # softmax
            d.mul_(-g.unsqueeze(1))
            d.scatter_add_(1, c.select(labels).unsqueeze(1), g.unsqueeze(1))  # + onehot(y)·g
            if need_h:
                grad_h.index_copy_(0, c.rows, (d.to(weight.dtype) @ weight).to(grad_h.dtype))
            if need_w:
                grad_w.addmm_(d.t(), c.hidden.float())
            del d
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def label_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: Union[int, str, None] = "auto",
) -> torch.Tensor:
    """Log-probability of each position's label under ``softmax(hidden @ weight.T)``, chunk by chunk.

    The fused counterpart of ``log_softmax(logits).gather(label)`` for cross-entropy, DPO and
    log-likelihood scoring: only labelled positions are projected, a few at a time, so no
    ``[tokens, vocab]`` tensor exists whole (forward or backward).

    Args:
        hidden: final hidden states ``[batch, seq, hidden]`` (or ``[tokens, hidden]``).
        weight: output layer ``[vocab, hidden]``.
        labels: ``[batch, seq]`` (or ``[tokens]``), aligned with the positions, -100 = ignore.
        chunk_size: positions per chunk, or ``"auto"`` (:func:`~kdistill.losses.chunked.auto_chunk_size`).
    Returns:
        float32 log-probs shaped like ``labels``, 0 where the label is -100; differentiable with
        respect to ``hidden`` and ``weight``.
    """
    H = hidden.shape[-1]
    lab = labels.reshape(-1)
    chunk_size = _chunk_size(chunk_size, lab, weight.shape[0], H)
    return _LabelLogprobs.apply(hidden.reshape(-1, H), weight, lab, chunk_size).view(labels.shape)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies, a float32 scalar (``[..., V]`` logits, aligned ``[...]`` labels, -100 ignored)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
