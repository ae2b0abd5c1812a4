"""The loss settings (:class:`LossSpec`) and the per-token loss, shared by the plain and fused paths.

With ``hard_label_weight`` w the per-token loss is ``(1 − w)·T²·D(P_T‖Q_T) + w·CE(Q_1, label)``
(Hinton et al. 2015's T², cross-entropy at temperature 1). :func:`_token_losses` computes it from
log-probabilities, and with ``grad`` also its closed-form gradient with respect to the student
logits (the divergence's ``g = ∂D/∂log Q`` through the softmax Jacobian, ``∂D/∂z = g − Q·Σg``,
z = logits / T), which the fused path uses instead of autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from kdistill.losses.divergences import _divergence, _finite, lookup
from kdistill.losses.topk import TopK, _topk_bins, _topk_grad_to_vocab

__all__ = ["LossSpec", "token_losses"]


@dataclass(frozen=True)
class LossSpec:
    """The settings of a distillation loss; ``divergence`` is a registered name (:data:`~kdistill.losses.DIVERGENCES`)."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    hard_label_weight: float = 0.0

    def __post_init__(self):
        lookup(self.divergence)  # ValueError for an unknown name
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0")
        for name in ("beta", "skew", "hard_label_weight"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


def _spec(divergence, temperature, beta, skew, hard_label_weight) -> LossSpec:
    """A :class:`LossSpec` from the public functions' keyword arguments (numbers as floats)."""
    return LossSpec(divergence, float(temperature), float(beta), float(skew), float(hard_label_weight))


def _student_log_probs(logits: torch.Tensor, spec: LossSpec, finite: bool):
    """``(log Q_T, log Q_1 or None)`` ``[N, V]`` float32 from logits ``[N, V]``; the second one only
    for a hard-label mix at T ≠ 1."""
    s = logits.float()
    T = spec.temperature
    ls = torch.log_softmax(s / T if T != 1.0 else s, dim=-1)
    ce = torch.log_softmax(s, dim=-1) if spec.hard_label_weight > 0.0 and T != 1.0 else None
    if finite:
        ls = _finite(ls)
        ce = _finite(ce) if ce is not None else None
    return ls, ce


def _teacher_log_probs(logits: torch.Tensor, T: float, finite: bool) -> torch.Tensor:
    """``log P_T`` ``[N, V]`` float32 from teacher logits ``[N, V]``."""
    lt = torch.log_softmax(logits.float() / T if T != 1.0 else logits.float(), dim=-1)
    return _finite(lt) if finite else lt


def _token_losses(ls, ce_logp, teacher, labels, spec: LossSpec, grad: bool = False):
    """Per-token losses ``[N]`` and, with ``grad``, their gradient w.r.t. the student logits ``[N, V]``.

    ``ls``: student log-probs at T ``[N, V]``; ``ce_logp``: at T = 1 (None: same as ``ls``);
    ``teacher``: log-probs at T ``[N, V]`` or a :class:`TopK` ``[N, k]``; ``labels`` ``[N]`` (all kept).
    """
    T, w = spec.temperature, spec.hard_label_weight
    q = ls.exp() if grad else None  # kept for the softmax Jacobian below
    if isinstance(teacher, TopK) and T != 1.0 and teacher.indices.shape[-1] < ls.shape[-1]:
        # Both sides are binned at T = 1 (the student's T = 1 log-probs are log_softmax(T·ls),
        # exactly, by shift invariance), then each bin's log-mass is divided by T and renormalized.
        # Treating the rest bucket as one token on *both* sides keeps the minimum where the student
        # equals the teacher (loss 0), which tempering only the teacher's bins would not.
        ls1 = torch.log_softmax(ls * T, dim=-1)  # the student at T = 1
        t_bins, s_bins1, s_rest1 = _topk_bins(ls1, teacher, 1.0)
        lt = torch.log_softmax(t_bins / T, dim=-1)
        s_bins = torch.log_softmax(_finite(s_bins1) / T, dim=-1)
        d, g = _divergence(spec.divergence, lt, s_bins, spec.beta, spec.skew, grad)
        if grad:  # chain back: tempered bins -> bins at T = 1 -> ls1 -> ls (each a log-softmax)
            g.addcmul_(s_bins.exp(), g.sum(-1, keepdim=True), value=-1.0).div_(T)
            g = _topk_grad_to_vocab(g, ls1, teacher.indices.long(), s_rest1)
            g.addcmul_(ls1.exp(), g.sum(-1, keepdim=True), value=-1.0).mul_(T)
        del lt, s_bins, s_bins1, ls1
    else:
        if isinstance(teacher, TopK):
            lt, s_bins, s_rest = _topk_bins(ls, teacher, T)
        else:
            lt, s_bins, s_rest = teacher, ls, None
        d, g = _divergence(spec.divergence, lt, s_bins, spec.beta, spec.skew, grad, q=None if s_bins is not ls else q)
        del lt, s_bins
        if grad and isinstance(teacher, TopK):
            g = _topk_grad_to_vocab(g, ls, teacher.indices.long(), s_rest)
    loss = d * ((1.0 - w) * T * T)
    if grad:
        # softmax Jacobian: ∂D/∂z = g − q·Σg, z = logits / T; ∂/∂logits = ∂/∂z / T, times (1−w)·T²
        g.addcmul_(q, g.sum(-1, keepdim=True), value=-1.0).mul_((1.0 - w) * T)
    if w > 0.0:
        ce_logp = ls if ce_logp is None else ce_logp
        lab = labels.long().clamp(min=0).unsqueeze(-1)
        loss = loss - w * ce_logp.gather(-1, lab).squeeze(-1)
        if grad:  # ∂CE/∂logits = softmax(logits) − onehot(label)
            g.add_(ce_logp.exp(), alpha=w).scatter_add_(-1, lab, torch.full(lab.shape, -w, device=g.device))
    return loss, g


def token_losses(
    student_logits: torch.Tensor,
    teacher: Union[torch.Tensor, TopK],
    labels: torch.Tensor,
    spec: LossSpec,
) -> torch.Tensor:
    """Per-token loss ``[N]`` for rows that are all kept (no masking here).

    ``(1 − w)·T²·D(P_T‖Q_T) + w·CE(Q_1, label)`` with w = ``spec.hard_label_weight``.
    ``student_logits`` ``[N, V]``; ``teacher`` logits ``[N, V]`` or a :class:`TopK` ``[N, k]``;
    ``labels`` ``[N]``.
    """
    ls, ce_logp = _student_log_probs(student_logits, spec, finite=True)
    if not isinstance(teacher, TopK):
        teacher = _teacher_log_probs(teacher, spec.temperature, finite=True)
    return _token_losses(ls, ce_logp, teacher, labels, spec)[0]
