"""The distillation losses: a plain path from logits and a chunked fused path from hidden states.

The plain path (:func:`distill_loss`) takes materialized ``[tokens, vocab]`` logits and lets
autograd differentiate the per-token loss (:func:`~kdistill.losses.tokens.token_losses`); it is
the reference the tests hold the fused path to.

The fused path (:func:`fused_distill_loss`) never builds the ``[tokens, vocab]`` logits: it walks
the unmasked tokens in chunks (:func:`~kdistill.losses.chunked.chunks`), projects one chunk of
student and teacher hidden states onto the vocabulary, and computes that chunk's loss *and* its
gradient with respect to the student logits in closed form (no autograd graph), which it
immediately folds into the gradients of the hidden states and the output weight. Each divergence
supplies ``g = ∂D/∂log Q`` next to its value; the softmax Jacobian turns it into
``∂D/∂z = g − Q·Σg`` (z = logits / T).

Both return the sum of the per-token losses over the tokens whose label is not -100, divided by
``num_items`` (the global count of unmasked tokens, for gradient accumulation and data
parallelism; it defaults to the local count); 0, with zero gradients, when no token is kept.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from kdistill.losses.chunked import IGNORE_INDEX, _chunk_size, _count, chunks, kept_rows, project
from kdistill.losses.tokens import LossSpec, _spec, _student_log_probs, _teacher_log_probs, _token_losses, token_losses
from kdistill.losses.topk import TopK

__all__ = ["distill_loss", "fused_distill_loss"]


# ---------------------------------------------------------------------------------------------
# plain path: from materialized logits (autograd)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: Union[torch.Tensor, TopK, None],
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    hard_label_weight: float = 0.0,
    num_items: Optional[Union[int, torch.Tensor]] = None,
    teacher_topk: Optional[TopK] = None,
) -> torch.Tensor:
    """Distillation loss from logits.

    Args:
        student_logits: ``[batch, seq, vocab]`` or ``[tokens, vocab]``.
        teacher_logits: same shape as ``student_logits`` (or None with ``teacher_topk``).
        labels: ``[batch, seq]`` or ``[tokens]``, aligned with the logits, -100 = ignore.
        teacher_topk: a :class:`TopK` with leading shape of ``labels`` instead of teacher logits.
        num_items: global count of unmasked tokens (defaults to the local count).
    Returns:
        scalar float32: sum of per-token losses / count (0 when there are no tokens).
    """
    spec = _spec(divergence, temperature, beta, skew, hard_label_weight)
    teacher = teacher_topk if teacher_topk is not None else teacher_logits
    if teacher is None:
        raise ValueError("give teacher_logits or teacher_topk")
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    lab = labels.reshape(-1)
    mask = lab != IGNORE_INDEX
    count = _count(mask, num_items)
    if isinstance(teacher, TopK):
        k = teacher.indices.shape[-1]
        t = TopK(teacher.indices.reshape(-1, k)[mask], teacher.logprobs.reshape(-1, k)[mask])
    else:
        if teacher.shape[-1] != V:
            raise ValueError(f"teacher vocab {teacher.shape[-1]} != student vocab {V}; slice to the shared vocabulary")
        t = teacher.reshape(-1, V)[mask]
    per_tok = token_losses(s[mask], t, lab[mask], spec)
    return per_tok.sum() / count.clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# fused path: from hidden states + output weights, chunk by chunk


class _FusedDistill(torch.autograd.Function):
    """Chunked loss whose gradients are computed during the forward pass.

    Only one ``[chunk, vocab]`` block of logits (student, teacher and their gradient) exists at a
    time; the backward pass just scales the stored ``[tokens, hidden]`` and ``[vocab, hidden]``
    gradients by the incoming gradient (usually 1: then it hands them over without a copy).

    Inputs: ``s_hidden`` ``[tokens, H]``, ``s_weight`` ``[V, H]``, ``t_hidden`` ``[tokens, H_t]`` and
    ``t_weight`` ``[V, H_t]`` (or None), ``labels`` ``[tokens]``, ``t_idx``/``t_logp`` ``[tokens, k]``
    (or None), a :class:`LossSpec`; ``want_grad``: whether grad mode was on at the call.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, labels, t_idx, t_logp, spec: LossSpec, num_items,
                chunk_size: int, want_grad: bool):
        rows = kept_rows(labels)
        count = _count(labels != IGNORE_INDEX, num_items).clamp(min=1.0)
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for c in chunks(s_hidden, s_weight, rows, chunk_size):
            ls, ce_logp = _student_log_probs(c.logits(), spec, finite=False)
            if t_idx is not None:
                teacher = TopK(c.select(t_idx), c.select(t_logp))
            else:
                teacher = _teacher_log_probs(project(c.select(t_hidden), t_weight), spec.temperature, finite=False)
            loss, g = _token_losses(ls, ce_logp, teacher, c.select(labels), spec, grad=need_h or need_w)
            del ls, ce_logp, teacher
            total += loss.sum()
            if need_h:
                grad_h.index_copy_(0, c.rows, (g.to(s_weight.dtype) @ s_weight).to(grad_h.dtype))
            if need_w:
                grad_w.addmm_(g.t(), c.hidden.float())
            del g
        if need_h:
            grad_h.div_(count.to(grad_h.dtype))
        if need_w:  # the float32 accumulator is freed here; the stored gradient has the weight's dtype
            grad_w = grad_w.div_(count).to(s_weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if torch.equal(grad_out, torch.ones_like(grad_out)):  # the usual case: no copy
            return grad_h, grad_w, None, None, None, None, None, None, None, None, None
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None


def fused_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    hard_label_weight: float = 0.0,
    chunk_size: Union[int, str, None] = "auto",
    num_items: Optional[Union[int, torch.Tensor]] = None,
    teacher_topk: Optional[TopK] = None,
) -> torch.Tensor:
    """Same value and gradients as :func:`distill_loss` on ``hidden @ weight.T``, chunk by chunk.

    Args:
        student_hidden: final hidden states ``[batch, seq, hidden]`` or ``[tokens, hidden]``.
        student_weight: student output layer ``[vocab, hidden]`` (gets a gradient).
        teacher_hidden: ``[..., teacher_hidden]`` (no gradient), or None with ``teacher_topk``.
        teacher_weight: teacher output layer ``[vocab, teacher_hidden]`` (no gradient).
        labels: ``[batch, seq]`` or ``[tokens]``, aligned with the positions, -100 = ignore.
        chunk_size: tokens per chunk, or ``"auto"``/None (:func:`~kdistill.losses.chunked.auto_chunk_size`); peak extra
            memory is a few ``[chunk, vocab]`` float32 blocks.
        num_items: global count of unmasked tokens (defaults to the local count).
        teacher_topk: a :class:`TopK` ``[..., k]`` instead of teacher hidden states and weight.
    Returns:
        scalar float32 loss; only unmasked rows are ever projected onto the vocabulary. The
        projections run in the inputs' dtype (as the model's own head would); everything after
        them, and the weight-gradient accumulator, in float32.
    """
    spec = _spec(divergence, temperature, beta, skew, hard_label_weight)
    H = student_hidden.shape[-1]
    s_h = student_hidden.reshape(-1, H)
    lab = labels.reshape(-1)
    if teacher_topk is not None:
        k = teacher_topk.indices.shape[-1]
        t_idx = teacher_topk.indices.reshape(-1, k)
        t_logp = teacher_topk.logprobs.reshape(-1, k)
        t_h = t_w = None
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("give teacher_hidden and teacher_weight, or teacher_topk")
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"teacher vocab {teacher_weight.shape[0]} != student vocab {student_weight.shape[0]}; slice to the shared vocabulary"
            )
        t_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        t_w = teacher_weight.detach()
        t_idx = t_logp = None
    chunk_size = _chunk_size(chunk_size, lab, student_weight.shape[0], H)
    return _FusedDistill.apply(
        s_h, student_weight, t_h, t_w, lab, t_idx, t_logp, spec, num_items, chunk_size, torch.is_grad_enabled()
    )
