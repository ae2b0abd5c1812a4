"""Losses between a teacher and a student that do not share a vocabulary (``loss.cross_tokenizer``).

The two tokenizations of an answer are aligned into spans that cover the same characters
(:mod:`kdistill.alignment`). For each span both models have read the same text, and their
next-token distributions just before the span are compared. When a side needs several tokens for
the span, its first-token distribution ``p`` is *merged* with the rest of the span: the entry of the
span's actual first token ``a`` is split into two events, "the span's text" (``p(a) · c``, with
``c`` the probability of the span's later tokens, at T = 1) and "``a``, then something else"
(``p(a) · (1 − c)``); every other token keeps ``p(y)``. The result is a distribution again, and
"the span's text" is the same event for both models whatever their tokens (a one-token span has
``c = 1``: nothing changes). Unlike TRL's GOLD, which scales the whole vector by ``c``, this never
asks the student to lower a token it needs because the teacher covers the same text in fewer tokens.

* ``uld`` (Universal Logit Distillation, Boizard et al. 2024): the L1 distance between the two
  merged distributions sorted in decreasing order, the shorter one padded with zeros to the longer
  vocabulary: ``Σ_i |sort(m_T)_i − sort(m_S)_i|`` — the Wasserstein-1 distance between the sorted
  vectors. It needs no token correspondence, so it transfers confidence, not which token.
* ``gold`` (vocabulary mapping + ULD for the rest): tokens whose strings are equal in both
  vocabularies form classes (:mod:`kdistill.vocab_match`; the two end-of-turn tokens are one
  class). Both merged distributions are coarse-grained onto "the span's text", the classes and one
  "rest" bin (every unmatched token), and the configured divergence (``loss.divergence``) compares
  them; the unmatched tokens' probabilities go through ULD as above. With identical tokenizers
  every token is its own class and the rest bins are empty: the value is exactly the ordinary
  divergence.

Both are multiplied by T² (temperature on both sides' first-token distributions) and, with
``hard_label_weight`` w, mixed as ``(1 − w)·Σ_spans + w·Σ_tokens CE``, divided by ``num_items``
(the global count of the student's trained tokens, like every loss here). The student side is
computed from its logits (plain path) or, when the head allows, chunk by chunk from its hidden
states (:class:`_SpanChunks`: only a ``[chunk, vocab]`` block at a time, gradients formed in the
forward); the two paths give the same value and gradients (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from kdistill.losses.chunked import IGNORE_INDEX, _chunk_size, _count, project
from kdistill.losses.divergences import _divergence, _finite
from kdistill.losses.likelihood import label_logprobs
from kdistill.losses.tokens import LossSpec, _spec

__all__ = ["CROSS_TOKENIZER_LOSSES", "CrossTarget", "VocabClasses", "cross_tokenizer_loss", "mapped_rows", "merge",
           "uld_rows"]

CROSS_TOKENIZER_LOSSES = ("uld", "gold")


@dataclass
class VocabClasses:
    """Token classes shared by two vocabularies: ``student`` ``[V_s]`` and ``teacher`` ``[V_t]`` long,
    each id's class or -1 (unmatched); ``n`` classes (see :func:`kdistill.vocab_match.vocab_classes`)."""

    student: torch.Tensor
    teacher: torch.Tensor
    n: int


@dataclass
class CrossTarget:
    """A teacher with another tokenizer, aligned to one student batch (``[batch, seq]`` labels).

    ``s_first`` ``[n]`` long: the flat student position (``b·seq + t``, label-aligned: the logits
    at t predict the span's first token) of each span; ``s_cont`` ``[m]`` long and ``cont_span``
    ``[m]`` long: the span's later student positions and their span; ``t_logp`` ``[n, V_t]``
    float32: the teacher's log-probs (T = 1) before each span; ``t_token`` ``[n]`` long: the
    teacher's first token of each span; ``t_logc`` ``[n]``: the teacher's log-probability (T = 1)
    of the span's later tokens (0 for one token); ``t_multi`` ``[n]`` bool: the teacher's span has
    later tokens (None: where ``t_logc < 0``); ``classes``: the vocabulary classes (``gold``).
    """

    s_first: torch.Tensor
    s_cont: torch.Tensor
    cont_span: torch.Tensor
    t_logp: torch.Tensor
    t_token: torch.Tensor
    t_logc: torch.Tensor
    classes: Optional[VocabClasses] = None
    t_multi: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------
# per span: the two losses on merged log-vectors (differentiable on the student side)


def _sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_i |sort↓(a)_i − sort↓(b)_i|`` per row for ``[N, Va]`` and ``[N, Vb]`` (zero-padded) -> ``[N]``."""
    sa = a.sort(dim=-1, descending=True).values
    sb = b.sort(dim=-1, descending=True).values
    width = max(sa.shape[-1], sb.shape[-1])
    sa = torch.nn.functional.pad(sa, (0, width - sa.shape[-1]))
    sb = torch.nn.functional.pad(sb, (0, width - sb.shape[-1]))
    return (sa - sb).abs().sum(-1)


def merge(lp: torch.Tensor, first: torch.Tensor, logc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A span's merged distribution from first-token log-probs ``lp`` ``[N, V]``, the span's first
    token ``first`` ``[N]`` and the log-probability of its later tokens ``logc`` ``[N]``: ``(log
    p(text) [N], log-vector [N, V])``, the vector's ``first`` entry holding ``p(first)·(1 − c)``."""
    lf = lp.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    return lf + logc, lp.scatter(-1, first.unsqueeze(-1), (lf + _log1mexp(logc)).unsqueeze(-1))


def uld_rows(le_s: torch.Tensor, lv_s: torch.Tensor, le_t: torch.Tensor, lv_t: torch.Tensor) -> torch.Tensor:
    """ULD per span between merged distributions (:func:`merge`, student ``[N]``/``[N, V_s]``,
    teacher ``[N]``/``[N, V_t]``) -> ``[N]``."""
    full = lambda le, lv: torch.cat([le.unsqueeze(-1), lv], dim=-1).exp()  # noqa: E731
    return _sorted_l1(full(le_t, lv_t), full(le_s, lv_s))


def _safe_log(s: torch.Tensor) -> torch.Tensor:
    """``log s`` for ``s ≥ 0`` with -inf (and a zero gradient, not NaN) where ``s`` is 0."""
    pos = s > 0
    return torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))), torch.full_like(s, -math.inf))


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim of ``[N, K]``; -inf, with zero gradients, for an all -inf row."""
    m = x.detach().amax(-1, keepdim=True) if x.shape[-1] else torch.zeros(x.shape[0], 1, device=x.device)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return _safe_log(torch.exp(x - m).sum(-1)) + m.squeeze(-1)


def _bins(le: torch.Tensor, lv: torch.Tensor, cls: torch.Tensor, n: int, text_class: torch.Tensor) -> torch.Tensor:
    """Log-masses ``[N, n+2]``: "the span's text" (``le`` ``[N]``), the vector ``exp(lv)`` ``[N, V]``
    summed per class ``cls`` ``[V]`` (-1 = none), and last the rest bin (the unmatched tokens).

    ``text_class`` ``[N, 2]``: classes whose string *is* the span's text (-1: none): a side that
    covers the span in one token gives its token's class; it joins "the span's text" (both are that
    text)."""
    matched = cls >= 0
    idx, x = cls[matched], lv[:, matched]
    top = torch.full((lv.shape[0], n), -math.inf, device=lv.device).scatter_reduce(
        1, idx.expand_as(x), x.detach(), "amax")  # per-class shift (detached: the value does not depend on it)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros_like(top).index_add(1, idx, torch.exp(x - top[:, idx]))
    classes = _safe_log(sums) + top
    le = le.unsqueeze(-1)
    for j in range(text_class.shape[-1]):  # the second one is a no-op when it repeats the first
        has = text_class[:, j:j + 1] >= 0
        k = text_class[:, j:j + 1].clamp(min=0)
        lk = classes.gather(1, k)
        le = torch.where(has, torch.logaddexp(le, lk), le)
        classes = classes.scatter(1, k, torch.where(has, torch.full_like(lk, -math.inf), lk))
    rest = _logsumexp(lv[:, ~matched])
    return torch.cat([le, classes, rest.unsqueeze(-1)], dim=-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends; -inf (zero gradient) at 0."""
    x = x.clamp(max=0.0)
    near = x > -math.log(2.0)
    a = torch.where(near, x, torch.full_like(x, -1.0))
    b = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, _safe_log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def mapped_rows(le_s: torch.Tensor, lv_s: torch.Tensor, le_t: torch.Tensor, lv_t: torch.Tensor,
                classes: VocabClasses, spec: LossSpec, text_class: torch.Tensor) -> torch.Tensor:
    """GOLD-style loss per span -> ``[N]``: ``spec.divergence`` between the bins of the merged
    distributions (the span's text, the classes, the rest), plus ULD between their unmatched tokens.
    ``text_class`` ``[N]``: the class whose string is the span's text, or -1 (see :func:`_bins`)."""
    t_bins = _bins(le_t, lv_t, classes.teacher, classes.n, text_class)
    s_bins = _bins(le_s, lv_s, classes.student, classes.n, text_class)
    d = _divergence(spec.divergence, _finite(t_bins), _finite(s_bins), spec.beta, spec.skew)[0]
    return d + _sorted_l1(lv_t[:, classes.teacher < 0].exp(), lv_s[:, classes.student < 0].exp())


def _span_rows(kind: str, spec: LossSpec, z: torch.Tensor, s_token: torch.Tensor, s_logc: torch.Tensor,
               t_logp: torch.Tensor, t_token: torch.Tensor, t_logc: torch.Tensor,
               classes: Optional[VocabClasses], text_class: Optional[torch.Tensor]) -> torch.Tensor:
    """``(1 − w)·T²·loss`` per span from student logits ``z`` ``[N, V_s]`` (float32) and the teacher."""
    T = spec.temperature
    le_s, lv_s = merge(torch.log_softmax(z / T, dim=-1), s_token, s_logc)
    le_t, lv_t = merge(torch.log_softmax(t_logp.float() / T, dim=-1), t_token, t_logc)
    if kind == "uld":
        rows = uld_rows(le_s, lv_s, le_t, lv_t)
    else:
        if classes is None:
            raise ValueError("the gold loss needs vocabulary classes")
        rows = mapped_rows(le_s, lv_s, le_t, lv_t, classes, spec, text_class)
    return rows * ((1.0 - spec.hard_label_weight) * T * T)


# ---------------------------------------------------------------------------------------------
# chunked student side


class _SpanChunks(torch.autograd.Function):
    """``Σ_spans`` of :func:`_span_rows` from span-start hidden states ``[n, H]`` and the output
    weight ``[V, H]``, chunk by chunk: each chunk's logits are projected, differentiated with
    autograd on that chunk alone, and folded into the hidden/weight/``s_logc`` gradients at once."""

    @staticmethod
    def forward(ctx, hidden, weight, s_logc, rows_fn, chunk_size: int, want_grad: bool):
        n = hidden.shape[0]
        need = want_grad and any(ctx.needs_input_grad[:3])
        grad_h = torch.zeros_like(hidden) if need else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need else None
        grad_c = torch.zeros_like(s_logc) if need else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk_size):
            b = min(n, a + chunk_size)
            h = hidden[a:b].to(weight.dtype)
            with torch.enable_grad():
                z = project(h, weight).float().detach().requires_grad_(need)
                lc = s_logc[a:b].detach().requires_grad_(need)
                loss = rows_fn(z, lc, a, b).sum()
            if need:
                gz, gc = torch.autograd.grad(loss, [z, lc])
                grad_h[a:b] = (gz.to(weight.dtype) @ weight).to(grad_h.dtype)
                grad_w.addmm_(gz.t(), h.float())
                grad_c[a:b] = gc
            total += loss.detach()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need else None, grad_c)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gc = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(gh), scale(gw), scale(gc), None, None, None


# ---------------------------------------------------------------------------------------------
# the loss


def _text_class(target: CrossTarget, s_tok: torch.Tensor) -> torch.Tensor:
    """``[n, 2]``: the class of the student's and of the teacher's first token where that side covers
    the span in one token (its string is the span's text), else -1."""
    if target.classes is None:
        raise ValueError("the gold loss needs vocabulary classes")
    n = s_tok.numel()
    s_multi = torch.zeros(n, dtype=torch.bool, device=s_tok.device)
    s_multi[target.cont_span] = True
    t_multi = target.t_multi if target.t_multi is not None else target.t_logc < 0
    none = torch.full((n,), -1, dtype=torch.long, device=s_tok.device)
    return torch.stack([torch.where(~s_multi, target.classes.student[s_tok], none),
                        torch.where(~t_multi, target.classes.teacher[target.t_token], none)], dim=-1)


def cross_tokenizer_loss(
    kind: str,
    labels: torch.Tensor,
    target: CrossTarget,
    logits: Optional[torch.Tensor] = None,
    hidden: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    hard_label_weight: float = 0.0,
    chunk_size: Union[int, str, None] = "auto",
    num_items: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """The ``uld`` or ``gold`` loss of a student batch against a :class:`CrossTarget`.

    Args:
        kind: ``uld`` or ``gold``.
        labels: the student's ``[batch, seq]`` labels (aligned with the logits, -100 = ignore).
        logits: student logits ``[batch, seq, V_s]`` (plain path), or
        hidden, weight: final hidden states ``[batch, seq, H]`` and output layer ``[V_s, H]`` (chunked).
        num_items: global count of trained student tokens (defaults to the local count).
    Returns:
        scalar float32: ``[(1 − w)·T²·Σ_spans loss + w·Σ_tokens CE] / num_items``.
    """
    if kind not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"unknown cross-tokenizer loss {kind!r}; expected one of {', '.join(CROSS_TOKENIZER_LOSSES)}")
    spec = _spec(divergence, temperature, beta, skew, hard_label_weight)
    lab = labels.reshape(-1)
    count = _count(lab != IGNORE_INDEX, num_items).clamp(min=1.0)
    w = spec.hard_label_weight
    # label log-probs: every trained token for the CE term, or only the spans' later tokens
    want = lab if w > 0 else torch.full_like(lab, IGNORE_INDEX).index_copy_(0, target.s_cont, lab[target.s_cont])
    if logits is not None:
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        lp = torch.log_softmax(flat.float(), -1).gather(-1, want.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        lp = lp * (want != IGNORE_INDEX)
    else:
        H = hidden.shape[-1]
        flat = hidden.reshape(-1, H)
        lp = label_logprobs(flat, weight, want, chunk_size) if bool((want != IGNORE_INDEX).any()) else None
    n = target.s_first.numel()
    s_logc = torch.zeros(n, dtype=torch.float32, device=lab.device)
    if target.s_cont.numel():
        s_logc = s_logc.index_add(0, target.cont_span, lp[target.s_cont])
    ce = -lp.sum() if (w > 0 and lp is not None) else torch.zeros((), device=lab.device)
    if n == 0 or w >= 1.0:
        kd = (flat.sum() * 0.0).float()
    else:
        s_tok = lab.index_select(0, target.s_first)  # the student's first token of each span
        text_class = _text_class(target, s_tok) if kind == "gold" else None

        def rows_fn(z, lc, a, b):
            return _span_rows(kind, spec, z, s_tok[a:b], lc, target.t_logp[a:b], target.t_token[a:b],
                              target.t_logc[a:b], target.classes, text_class[a:b] if text_class is not None else None)

        if logits is not None:
            kd = rows_fn(flat.index_select(0, target.s_first).float(), s_logc, 0, n).sum()
        else:
            size = _chunk_size(chunk_size, lab, weight.shape[0] + target.t_logp.shape[-1], H)
            kd = _SpanChunks.apply(flat.index_select(0, target.s_first), weight, s_logc, rows_fn, size,
                                   torch.is_grad_enabled())
    return (kd + w * ce) / count
