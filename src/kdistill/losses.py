"""Distillation losses: divergences as pure functions, a plain path and a chunked fused path.

Notation: P = teacher, Q = student, both ``softmax(logits / T)``. Every divergence returns the
per-token value summed over the vocabulary; the losses multiply it by T² (Hinton et al. 2015) and
average over the tokens whose label is not -100.

* ``forward_kl``       KL(P‖Q)
* ``reverse_kl``       KL(Q‖P)
* ``jsd``              β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q (GKD). As in TRL's
                       ``generalized_jsd_loss``, β = 0 is forward KL and β = 1 reverse KL.
* ``skew_forward_kl``  KL(P‖αP + (1−α)Q)  (DistiLLM), α = ``skew``
* ``skew_reverse_kl``  KL(Q‖(1−α)P + αQ)
* ``tvd``              ½·Σ|P − Q|

With ``hard_label_weight`` w the per-token loss is ``(1 − w)·T²·D(P_T‖Q_T) + w·CE(Q_1, label)``
(cross-entropy at temperature 1).

Labels are *aligned with the logits*: ``labels[i]`` is the token that ``logits[i]`` predicts
(already shifted for causal LMs), -100 where the position is ignored. The loss is the sum of the
per-token losses divided by ``num_items`` (the global count of unmasked tokens, for gradient
accumulation and data parallelism; it defaults to the local count); 0, with zero gradients, when
no token is kept.

All math is float32 whatever the input dtype. ``-inf`` log-probabilities (a masked vocabulary,
in the teacher or the student) are replaced by ``-1e4``, whose ``exp`` is exactly 0 in float32:
``0·log 0`` terms are then 0, and a token the student rules out but the teacher does not costs a
large finite amount instead of ``inf``. Finite values are never clamped, so extreme logits
(±1e4) keep their exact value and gradient.

Top-k teachers (an offline cache keeps only the teacher's k most likely tokens per position) are
given as ``TopK(indices, logprobs)``. The tail is kept explicitly as one extra "rest" bucket: both
distributions are coarse-grained onto the k cached tokens plus one bucket holding all other tokens
(teacher: ``1 − Σ top-k``; student: its exact mass outside those k tokens). The divergence between
the coarse-grained distributions is exact, and at T = 1 the KLs are lower bounds of the
full-vocabulary values (data-processing inequality). The teacher's buckets are renormalized; with a
temperature T ≠ 1 both distributions are binned at T = 1 and then every bin's log-mass, the rest
bucket's included, is divided by T and renormalized, on the teacher's and the student's side alike
(the tail's shape is unknown, so it is tempered like a single token): the loss is then 0 exactly
when the student equals the teacher, and at T ≠ 1 the top-k value approximates the full one. When k equals the vocabulary size there
is no rest bucket and the value is exactly the full-vocabulary one at every T.

The fused path (:func:`fused_distill_loss`) never builds the ``[tokens, vocab]`` logits: it walks
the unmasked tokens in chunks, projects one chunk of student and teacher hidden states onto the
vocabulary, and computes that chunk's loss *and* its gradient with respect to the student logits
in closed form (no autograd graph), which it immediately folds into the gradients of the hidden
states and the output weight. Each divergence supplies ``g = ∂D/∂log Q`` next to its value; the
softmax Jacobian turns it into ``∂D/∂z = g − Q·Σg`` (z = logits / T). The plain path
(:func:`distill_loss`) differentiates the same formulas with autograd and is the reference the
tests hold the fused path to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

# -inf log-probs (masked vocabulary) become this; exp(_LOG_FLOOR) == 0 in float32.
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
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0")
        for name in ("beta", "skew", "hard_label_weight"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


# ---------------------------------------------------------------------------------------------
# divergences on log-probabilities: [N, V] float32 -> [N] (and the gradient w.r.t. log Q)


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """Replace -inf (masked vocabulary) by ``_LOG_FLOOR``; finite values are left exactly as they are."""
    return torch.where(torch.isneginf(logp), _LOG_FLOOR, logp)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·A + (1−w)·B) from finite log-probs, for w in [0, 1].

    At w = 0 or 1 one side gets weight log 0 = -inf: the value is exactly the other side, and both
    stay in the autograd graph (a loss that is identically 0 can still be backpropagated).
    """
    log_w = math.log(w) if w > 0.0 else -math.inf
    log_1mw = math.log1p(-w) if w < 1.0 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + log_1mw)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


# In-place updates below only touch tensors built for the gradient (``grad=True`` runs without
# autograd), never one that autograd saved for the plain path.
def _divergence(kind: str, lt: torch.Tensor, ls: torch.Tensor, beta: float, skew: float, grad: bool = False, q=None):
    """``(D [N], g [N, V] or None)`` for finite teacher/student log-probs ``lt``, ``ls`` ``[N, V]``.

    ``g = ∂D/∂ls`` up to a multiple of Q per row (which the softmax Jacobian cancels); ``q``:
    ``ls.exp()`` when the caller already has it.
    """
    if kind == "jsd" and beta in (0.0, 1.0):  # TRL's endpoints
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    q = ls.exp() if q is None and kind != "forward_kl" else q
    if kind == "forward_kl":  # Σ p·(lt − ls);  g = −p
        p = lt.exp()
        return _dot(p, lt - ls), (p.neg_() if grad else None)
    if kind == "reverse_kl":  # Σ q·(ls − lt);  g = q·(ls − lt)  (+q)
        r = (ls - lt) * q
        return r.sum(-1), (r if grad else None)
    if kind == "jsd":  # g = (1−β)·q·(ls − lm)  (+ const·q)
        lm = _log_mix(lt, ls, beta)
        r = (ls - lm) * q
        return beta * _dot(lt.exp(), lt - lm) + (1.0 - beta) * r.sum(-1), (r.mul_(1.0 - beta) if grad else None)
    if kind == "skew_forward_kl":  # m = αp + (1−α)q;  g = −(1−α)·p·q/m
        lm = _log_mix(lt, ls, skew)
        return _dot(lt.exp(), lt - lm), (torch.exp(lt + ls - lm).mul_(skew - 1.0) if grad else None)
    if kind == "skew_reverse_kl":  # m = (1−α)p + αq;  g = q·(ls − lm) − α·q²/m  (+q)
        lm = _log_mix(ls, lt, skew)
        r = (ls - lm) * q
        return r.sum(-1), (r.sub_(torch.exp(2.0 * ls - lm).mul_(skew)) if grad else None)
    if kind == "tvd":  # ½·Σ|q − p|;  g = ½·q·sign(q − p)
        diff = lt.exp().neg_().add_(q) if grad else q - lt.exp()
        return 0.5 * diff.abs().sum(-1), (diff.sign_().mul_(q).mul_(0.5) if grad else None)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher P and student Q given as log-probs ``[N, V]`` -> ``[N]`` (float32)."""
    return _divergence(kind, _finite(t_logp.float()), _finite(s_logp.float()), float(beta), float(skew))[0]


# ---------------------------------------------------------------------------------------------
# top-k teachers: coarse-grain onto the k cached tokens plus a "rest" bucket


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _topk_bins(ls: torch.Tensor, topk: TopK, temperature: float):
    """``(teacher_bins, student_bins, student_rest)``: log-probs ``[N, k+1]`` (last = rest) and the
    student's rest log-mass ``[N, 1]``; with k = vocab, ``[N, k]`` bins and ``None``.

    ``ls``: finite student log-probs at temperature T ``[N, V]``; ``topk``: teacher at T = 1 ``[N, k]``.
    """
    idx = topk.indices.long()
    t_top = _finite(topk.logprobs.float())
    s_top = ls.gather(-1, idx)
    if idx.shape[-1] >= ls.shape[-1]:  # the whole vocabulary (a permutation): no rest bucket
        return torch.log_softmax(t_top / temperature, dim=-1), s_top, None
    t_rest = _log1mexp(torch.logsumexp(t_top, dim=-1, keepdim=True))
    t_bins = torch.log_softmax(_finite(torch.cat([t_top, t_rest], dim=-1)) / temperature, dim=-1)
    s_rest = torch.logsumexp(ls.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
    return t_bins, torch.cat([s_top, s_rest], dim=-1), s_rest


def _topk_grad_to_vocab(g: torch.Tensor, ls: torch.Tensor, idx: torch.Tensor, s_rest) -> torch.Tensor:
    """Chain ``∂D/∂(student bins)`` ``[N, k(+1)]`` back to ``∂D/∂ls`` ``[N, V]``.

    A top-k bin is one entry of ``ls``; the rest bin is ``logsumexp`` of the others, whose
    derivative is each other token's share ``q_j / q_rest`` of the rest mass.
    """
    k = idx.shape[-1]
    if s_rest is None:
        out = torch.zeros_like(ls)
    else:
        out = ls.scatter(-1, idx, float("-inf")).sub_(s_rest).exp_().mul_(g[:, k:])
    return out.scatter_add_(-1, idx, g[:, :k])


# ---------------------------------------------------------------------------------------------
# per-token losses, shared by both paths


def _student_log_probs(logits: torch.Tensor, spec: LossSpec, finite: bool):
    """``(log Q_T, log Q_1 or None)`` in float32; the second one only for a hard-label mix at T ≠ 1."""
    s = logits.float()
    T = spec.temperature
    ls = torch.log_softmax(s / T if T != 1.0 else s, dim=-1)
    ce = torch.log_softmax(s, dim=-1) if spec.hard_label_weight > 0.0 and T != 1.0 else None
    if finite:
        ls = _finite(ls)
        ce = _finite(ce) if ce is not None else None
    return ls, ce


def _teacher_log_probs(logits: torch.Tensor, T: float, finite: bool) -> torch.Tensor:
    lt = torch.log_softmax(logits.float() / T if T != 1.0 else logits.float(), dim=-1)
    return _finite(lt) if finite else lt


def _token_losses(ls, ce_logp, teacher, labels, spec: LossSpec, grad: bool = False):
    """Per-token losses ``[N]`` and, with ``grad``, their gradient w.r.t. the student logits ``[N, V]``.

    ``ls``: student log-probs at T; ``ce_logp``: at T = 1 (None: same as ``ls``); ``teacher``:
    log-probs at T ``[N, V]`` or a :class:`TopK`; ``labels`` ``[N]`` (all kept).
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
    ``student_logits`` ``[N, V]``; ``teacher`` logits ``[N, V]`` or a :class:`TopK` ``[N, k]``.
    """
    ls, ce_logp = _student_log_probs(student_logits, spec, finite=True)
    if not isinstance(teacher, TopK):
        teacher = _teacher_log_probs(teacher, spec.temperature, finite=True)
    return _token_losses(ls, ce_logp, teacher, labels, spec)[0]


def _count(mask: torch.Tensor, num_items) -> torch.Tensor:
    if num_items is None:
        return mask.sum().float()
    return torch.as_tensor(num_items, dtype=torch.float32, device=mask.device)


def _spec(divergence, temperature, beta, skew, hard_label_weight) -> LossSpec:
    return LossSpec(divergence, float(temperature), float(beta), float(skew), float(hard_label_weight))


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


def auto_chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk for :func:`fused_distill_loss` ``chunk_size="auto"``.

    A ``[chunk, vocab]`` block holds about as many values as the ``[tokens, hidden]`` hidden states
    (Liger-Kernel's rule: the loss never needs much more memory than its input), but at least 2²⁴
    (64 MB of float32) so the matmuls stay efficient; rounded down to a power of two.
    """
    rows = max(tokens * hidden, 1 << 24) // max(vocab, 1)
    rows = 1 << max(int(rows).bit_length() - 1, 0)
    return max(1, min(rows, tokens))


class _FusedDistill(torch.autograd.Function):
    """Chunked loss whose gradients are computed during the forward pass.

    Only one ``[chunk, vocab]`` block of logits (student, teacher and their gradient) exists at a
    time; the backward pass just scales the stored ``[tokens, hidden]`` and ``[vocab, hidden]``
    gradients by the incoming gradient (usually 1: then it hands them over without a copy).
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, labels, t_idx, t_logp, spec, num_items, chunk_size, want_grad):
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
        count = _count(labels != IGNORE_INDEX, num_items).clamp(min=1.0)
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        h_sel, lab_sel = s_hidden.index_select(0, rows), labels.index_select(0, rows)
        if t_idx is not None:
            t_idx, t_logp = t_idx.index_select(0, rows), t_logp.index_select(0, rows)
        else:
            t_hidden = t_hidden.index_select(0, rows)
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            h = h_sel[sl].to(s_weight.dtype)  # hidden states from an autocast forward may be narrower
            ls, ce_logp = _student_log_probs(h @ s_weight.t(), spec, finite=False)
            if t_idx is not None:
                teacher = TopK(t_idx[sl], t_logp[sl])
            else:
                teacher = _teacher_log_probs(t_hidden[sl].to(t_weight.dtype) @ t_weight.t(), spec.temperature, finite=False)
            loss, g = _token_losses(ls, ce_logp, teacher, lab_sel[sl], spec, grad=need_h or need_w)
            del ls, ce_logp, teacher
            total += loss.sum()
            if need_h:
                grad_h.index_copy_(0, rows[sl], (g.to(s_weight.dtype) @ s_weight).to(grad_h.dtype))
            if need_w:
                grad_w.addmm_(g.t(), h.float())
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
        chunk_size: tokens per chunk, or ``"auto"``/None (:func:`auto_chunk_size`); peak extra
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
    if chunk_size is None or chunk_size == "auto":
        n = int((lab != IGNORE_INDEX).sum())
        chunk_size = auto_chunk_size(max(n, 1), student_weight.shape[0], H)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or 'auto', got {chunk_size!r}")
    return _FusedDistill.apply(
        s_h, student_weight, t_h, t_w, lab, t_idx, t_logp, spec, num_items, chunk_size, torch.is_grad_enabled()
    )


class _LabelLogprobs(torch.autograd.Function):
    """Chunked ``log softmax(hidden @ weight.T)[label]``; the backward recomputes each chunk's logits.

    The output is a vector (its upstream gradient is not known in the forward pass), so unlike
    :class:`_FusedDistill` the gradient cannot be formed ahead: the forward keeps only the
    per-row log-normalizers, and the backward projects each chunk again and applies
    ``d log p(y) / d logits = onehot(y) − softmax``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        with torch.autocast(hidden.device.type, enabled=False):  # the backward recomputes in the same dtype
            return _LabelLogprobs._forward(ctx, hidden, weight, labels, chunk_size)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, chunk_size):
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
        out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start : start + chunk_size]
            logits = (hidden.index_select(0, r).to(weight.dtype) @ weight.t()).float()
            lse[start : start + r.numel()] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, labels.index_select(0, r).unsqueeze(1)).squeeze(1)
            out.index_copy_(0, r, picked - lse[start : start + r.numel()])
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
        for start in range(0, rows.numel(), ctx.chunk_size):
            r = rows[start : start + ctx.chunk_size]
            h = hidden.index_select(0, r).to(weight.dtype)
            g = g_all.index_select(0, r)
            d = torch.exp((h @ weight.t()).float() - lse[start : start + r.numel()].unsqueeze(1))  # softmax
            d.mul_(-g.unsqueeze(1))
            d.scatter_add_(1, labels.index_select(0, r).unsqueeze(1), g.unsqueeze(1))  # + onehot(y)·g
            if need_h:
                grad_h.index_copy_(0, r, (d.to(weight.dtype) @ weight).to(grad_h.dtype))
            if need_w:
                grad_w.addmm_(d.t(), h.float())
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
        chunk_size: positions per chunk, or ``"auto"`` (:func:`auto_chunk_size`).
    Returns:
        float32 log-probs shaped like ``labels``, 0 where the label is -100; differentiable with
        respect to ``hidden`` and ``weight``.
    """
    H = hidden.shape[-1]
    lab = labels.reshape(-1)
    if chunk_size is None or chunk_size == "auto":
        chunk_size = auto_chunk_size(max(int((lab != IGNORE_INDEX).sum()), 1), weight.shape[0], H)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or 'auto', got {chunk_size!r}")
    return _LabelLogprobs.apply(hidden.reshape(-1, H), weight, lab, chunk_size).view(labels.shape)


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
