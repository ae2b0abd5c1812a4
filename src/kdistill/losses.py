"""Distillation losses: divergences as pure functions, a plain path and a chunked fused path.

Notation: P = teacher, Q = student, both ``softmax(logits / T)``. Every divergence returns the
per-token value summed over the vocabulary; the losses multiply by T² (Hinton et al. 2015) and
average over the tokens whose label is not -100.

* ``forward_kl``       KL(P‖Q)
* ``reverse_kl``       KL(Q‖P)
* ``jsd``              β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q (GKD). As in TRL's
                       ``generalized_jsd_loss``, β = 0 is forward KL and β = 1 reverse KL.
* ``skew_forward_kl``  KL(P‖αP + (1−α)Q)  (DistiLLM), α = ``skew``
* ``skew_reverse_kl``  KL(Q‖(1−α)P + αQ)
* ``tvd``              ½·Σ|P − Q|

Labels are *aligned with the logits*: ``labels[i]`` is the token that ``logits[i]`` predicts
(already shifted for causal LMs), -100 where the position is ignored.

All math is float32 whatever the input dtype. ``num_items`` replaces the local count of unmasked
tokens by a global one (gradient accumulation, data parallelism): the loss is then a sum over
local tokens divided by ``num_items``.

Top-k teachers (an offline cache keeps only the teacher's k most likely tokens per position) are
given as ``TopK(indices, logprobs)``. The tail is kept explicitly as one extra "rest" bucket: both
distributions are coarse-grained onto the k cached tokens plus one bucket holding all other tokens
(teacher: ``1 − Σ top-k``; student: its own mass outside those k tokens). The divergence between
the coarse-grained distributions is exact, and for KL it is a lower bound of the full-vocabulary
value (data-processing inequality). With a temperature T ≠ 1 the cached log-probs are divided by T
and the rest bucket's log-mass is divided by T like a single token's, then renormalized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

# Log-probs are clamped here so that 0·log0 terms stay 0 (and their gradients finite) when a
# distribution has -inf entries (masked vocabulary). exp(_LOG_FLOOR) == 0 in float32.
_LOG_FLOOR = -1.0e4


class TopK(NamedTuple):
    """A top-k teacher: ``indices`` ``[..., k]`` (long) and ``logprobs`` ``[..., k]`` at T = 1."""

    indices: torch.Tensor
    logprobs: torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    hard_label_weight: float = 0.0

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; expected one of {', '.join(DIVERGENCES)}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        for name in ("beta", "skew", "hard_label_weight"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


# ---------------------------------------------------------------------------------------------
# divergences on log-probabilities: [N, V] float32 -> [N]


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) per row, from log-probs ``[N, V]``. Rows where A is 0 contribute 0."""
    log_a = log_a.clamp(min=_LOG_FLOOR)
    log_b = log_b.clamp(min=_LOG_FLOOR)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·A + (1−w)·B) from log-probs, stable for w in [0, 1]."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher P and student Q given as log-probs ``[N, V]`` -> ``[N]``."""
    if kind == "forward_kl":
        return _kl(t_logp, s_logp)
    if kind == "reverse_kl":
        return _kl(s_logp, t_logp)
    if kind == "jsd":
        if beta <= 0.0:
            return _kl(t_logp, s_logp)
        if beta >= 1.0:
            return _kl(s_logp, t_logp)
        log_m = _log_mix(t_logp, s_logp, beta)
        return beta * _kl(t_logp, log_m) + (1.0 - beta) * _kl(s_logp, log_m)
    if kind == "skew_forward_kl":
        return _kl(t_logp, _log_mix(t_logp, s_logp, skew))
    if kind == "skew_reverse_kl":
        return _kl(s_logp, _log_mix(s_logp, t_logp, skew))
    if kind == "tvd":
        return 0.5 * (t_logp.clamp(min=_LOG_FLOOR).exp() - s_logp.clamp(min=_LOG_FLOOR).exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def coarse_topk(s_logp: torch.Tensor, topk: TopK, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-grain onto the k cached tokens plus a "rest" bucket.

    Args:
        s_logp: student log-probs at temperature T, ``[N, V]`` float32.
        topk: teacher indices/log-probs at T = 1, ``[N, k]``.
    Returns:
        ``(teacher_bins, student_bins)``: log-probs ``[N, k+1]`` (last column = rest).
    """
    idx = topk.indices.long()
    t_top = topk.logprobs.float()
    t_rest = _log1mexp(torch.logsumexp(t_top, dim=-1, keepdim=True))
    t_bins = torch.cat([t_top, t_rest], dim=-1)
    if temperature != 1.0:
        t_bins = torch.log_softmax(t_bins.clamp(min=_LOG_FLOOR) / temperature, dim=-1)
    s_top = s_logp.gather(-1, idx)
    s_rest = _log1mexp(torch.logsumexp(s_top, dim=-1, keepdim=True))
    return t_bins, torch.cat([s_top, s_rest], dim=-1)


def token_losses(
    student_logits: torch.Tensor,
    teacher: Union[torch.Tensor, TopK],
    labels: torch.Tensor,
    spec: LossSpec,
) -> torch.Tensor:
    """Per-token loss ``[N]`` for rows that are all kept (no masking here).

    ``(1 − w)·T²·D(P_T‖Q_T) + w·CE(Q_1, label)`` with w = ``spec.hard_label_weight``.
    ``student_logits`` ``[N, V]``; ``teacher`` logits ``[N, V]`` or a :class:`TopK` ``[N, k]``.
    """
    T = spec.temperature
    s = student_logits.float()
    s_logp = torch.log_softmax(s / T, dim=-1)
    if isinstance(teacher, TopK):
        t_logp, s_logp_d = coarse_topk(s_logp, teacher, T)
    else:
        t_logp = torch.log_softmax(teacher.float() / T, dim=-1)
        s_logp_d = s_logp
    loss = divergence(t_logp, s_logp_d, spec.divergence, spec.beta, spec.skew) * (T * T)
    w = spec.hard_label_weight
    if w > 0.0:
        ce_logp = s_logp if T == 1.0 else torch.log_softmax(s, dim=-1)
        ce = -ce_logp.gather(-1, labels.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = (1.0 - w) * loss + w * ce
    return loss


def _count(mask: torch.Tensor, num_items) -> torch.Tensor:
    if num_items is None:
        return mask.sum().float()
    return torch.as_tensor(num_items, dtype=torch.float32, device=mask.device)


def _spec(divergence, temperature, beta, skew, hard_label_weight) -> LossSpec:
    return LossSpec(divergence, float(temperature), float(beta), float(skew), float(hard_label_weight))


# ---------------------------------------------------------------------------------------------
# plain path: from materialized logits


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
        t = teacher.reshape(-1, teacher.shape[-1])[mask]
    per_tok = token_losses(s[mask], t, lab[mask], spec)
    return per_tok.sum() / count.clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# fused path: from hidden states + output weights, chunk by chunk


class _FusedDistill(torch.autograd.Function):
    """Chunked loss whose gradients are computed during the forward pass.

    Only one ``[chunk, vocab]`` block of logits (student, teacher and their gradient) exists at a
    time; the backward pass just scales the stored ``[tokens, hidden]`` and ``[vocab, hidden]``
    gradients by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, labels, t_idx, t_logp, spec, num_items, chunk_size):
        mask = labels != IGNORE_INDEX
        rows = mask.nonzero().squeeze(-1)
        count = _count(mask, num_items).clamp(min=1.0)
        h_sel = s_hidden.index_select(0, rows)
        lab_sel = labels.index_select(0, rows)
        if t_idx is not None:
            t_idx_sel, t_logp_sel = t_idx.index_select(0, rows), t_logp.index_select(0, rows)
        else:
            t_sel = t_hidden.index_select(0, rows)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_h_sel = torch.zeros_like(h_sel) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            stop = start + chunk_size
            h = h_sel[start:stop]
            with torch.no_grad():
                if t_idx is not None:
                    teacher = TopK(t_idx_sel[start:stop], t_logp_sel[start:stop])
                else:
                    teacher = t_sel[start:stop] @ t_weight.t()
            logits = (h @ s_weight.t()).float().requires_grad_(need_h or need_w)
            with torch.enable_grad():
                chunk = token_losses(logits, teacher, lab_sel[start:stop], spec).sum()
            if need_h or need_w:
                (g,) = torch.autograd.grad(chunk, logits)
                g = g.to(s_weight.dtype)
                if need_h:
                    grad_h_sel[start:stop] = g @ s_weight
                if need_w:
                    grad_w.addmm_(g.t().float(), h.float())
                del g
            total += chunk.detach()
            del logits, teacher, chunk
        ctx.count = count
        grad_h = None
        if need_h:
            grad_h = torch.zeros_like(s_hidden)
            grad_h.index_copy_(0, rows, grad_h_sel)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.has = (need_h, need_w)
        ctx.w_dtype = s_weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.count
        gh = (grad_h * scale.to(grad_h.dtype)) if ctx.has[0] else None
        gw = (grad_w * scale).to(ctx.w_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None, None, None, None, None, None


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
    chunk_size: int = 1024,
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
        chunk_size: tokens per chunk; peak extra memory is a few ``[chunk, vocab]`` float32 blocks.
    Returns:
        scalar float32 loss; only unmasked rows are ever projected onto the vocabulary.
    """
    spec = _spec(divergence, temperature, beta, skew, hard_label_weight)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
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
    return _FusedDistill.apply(s_h, student_weight, t_h, t_w, lab, t_idx, t_logp, spec, num_items, int(chunk_size))


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies in float32 (``[..., V]`` logits, aligned labels, -100 ignored)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


# ---------------------------------------------------------------------------------------------
# preference losses (DPO). Owned by the on-policy / preference methods (issue 6); kept separate
# from the divergences above.


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the labelled tokens of each sequence.

    Args:
        logits: ``[batch, seq, vocab]`` (any dtype; the log-softmax is taken in float32).
        labels: ``[batch, seq]`` aligned with the logits (``labels[b, t]`` is the token the logits
            at t predict), -100 on prompt, padding and everything that is not the completion.
    Returns:
        ``[batch]`` float32: ``Σ_t log softmax(logits[b, t])[labels[b, t]]`` over unmasked t.
    """
    mask = labels != IGNORE_INDEX
    lp = logits.float()
    tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lp, dim=-1)
    return (tok * mask).sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023), per pair.

    With implicit rewards ``r_c = β·(log π(y_c|x) − log π_ref(y_c|x))`` and likewise ``r_r``, the
    loss of a pair is ``−log σ(r_c − r_r)`` (with ``label_smoothing`` ε: the conservative DPO mix
    ``−(1−ε)·log σ(m) − ε·log σ(−m)``).

    Args:
        *_logps: ``[pairs]`` sequence log-prob sums (see :func:`sequence_logprobs`); the reference
            ones are constants (computed under ``no_grad``).
    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[pairs]`` float32; the rewards are
        detached. Sum the losses and divide by the global number of pairs.
    """
    if beta <= 0:
        raise ValueError("beta must be > 0")
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float().detach(), ref_rejected_logps.float().detach()
    margin = beta * ((pc - rc) - (pr - rr))
    losses = -F.logsigmoid(margin)
    if label_smoothing > 0:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (-F.logsigmoid(-margin))
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
