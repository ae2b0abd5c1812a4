"""Several teachers at once (``teachers:`` in the config), live or cached, with weights.

Two ways to combine them (``loss.teacher_mix``):

* ``mixture`` (default): the target is the weighted mixture in probability space,
  ``P = Σ_i w_i · P_i`` (weights normalized to sum to 1). With live teachers only, the full
  distributions are mixed (:func:`mix_logprobs`, exact). When any teacher is a cache, every teacher
  is reduced to its top-k and the mixture is formed on the union of their ids
  (:func:`mix_topk`): a token outside teacher i's top-k counts as 0 for that teacher, i.e. its
  share stays in teacher i's tail; the ``k`` largest mixed entries are kept (k = the largest
  cache's top_k) and everything else, ``Σ_i w_i · tail_i`` plus the dropped union entries, is the
  tail bucket of the loss. A temperature T applies to the mixture (``P^(1/T)``, renormalized).
* ``sum``: the loss is ``Σ_i w_i · D(P_i ‖ Q)``, one divergence per teacher, each on its own
  signal (full or top-k). Teachers with another tokenizer than the student's (``loss.cross_tokenizer``)
  are always combined this way: distributions over different vocabularies cannot be mixed.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from kdistill.losses import TopK
from kdistill.teachers.base import HeldOut, Teacher, TeacherSignal


def normalize_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError("teacher weights must be non-negative with a positive sum")
    return [float(w) / total for w in weights]


def mix_logprobs(logprobs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``log Σ_i w_i · exp(logprobs_i)``: the mixture of full distributions.

    Args:
        logprobs: per teacher, log-probs ``[..., vocab]`` (normalized).
        weights: one per teacher (normalized here).
    Returns:
        float32 log-probs ``[..., vocab]``.
    """
    ws = normalize_weights(weights)
    parts = [lp.float() + math.log(w) for lp, w in zip(logprobs, ws) if w > 0]
    return torch.logsumexp(torch.stack(parts), dim=0)


def mix_topk(topks: Sequence[TopK], weights: Sequence[float], k: Optional[int] = None) -> TopK:
    """Mixture of top-k teachers on the union of their ids.

    Args:
        topks: per teacher, ``TopK(indices [..., k_i], logprobs [..., k_i])`` (ids distinct per row).
        weights: one per teacher (normalized here).
        k: entries kept (default: the largest k_i); at most the union's size.
    Returns:
        ``TopK([..., k], [..., k])`` sorted by mixed probability, descending. For a token u,
        ``P(u) = Σ_i w_i · p_i(u)`` with ``p_i(u) = 0`` when u is not in teacher i's top-k.
    """
    ws = normalize_weights(weights)
    k = k or max(t.indices.shape[-1] for t in topks)
    k = min(k, max(t.indices.shape[-1] for t in topks))  # the union has at least this many distinct ids
    union = torch.cat([t.indices.long() for t in topks], dim=-1)  # [..., K]
    mixed = torch.zeros(union.shape, dtype=torch.float64, device=union.device)
    for t, w in zip(topks, ws):
        if w == 0:
            continue
        hit = union.unsqueeze(-1) == t.indices.long().unsqueeze(-2)  # [..., K, k_i]
        p = t.logprobs.double().exp().unsqueeze(-2)
        mixed += w * (hit * p).sum(-1)
    same = union.unsqueeze(-1) == union.unsqueeze(-2)  # [..., K, K]
    repeat = torch.tril(same, diagonal=-1).any(-1)  # an earlier slot holds the same id
    score = torch.where(repeat, torch.full_like(mixed, -1.0), mixed)
    top = score.topk(k, dim=-1, sorted=True)
    return TopK(union.gather(-1, top.indices), torch.log(top.values.clamp(min=0.0)).float())


def topk_of(logprobs: torch.Tensor, k: int) -> TopK:
    """The top-k of full log-probs ``[..., vocab]``."""
    top = logprobs.float().topk(k, dim=-1, sorted=True)
    return TopK(top.indices, top.values)


class MultiTeacher(Teacher):
    """Combines teachers (:class:`LocalTeacher`, :class:`CachedTeacher`, ...) into one signal.

    It offers what every one of them offers, and token-level signal only (no hidden states, no
    text); it is made by :func:`kdistill.teachers.build.build_teacher` for a ``teachers:`` list.

    Args:
        teachers: objects with ``signal(batch, hidden)``.
        weights: one per teacher (normalized).
        mode: ``mixture`` or ``sum`` (see the module docstring).
        names: for reports.
    """

    kind = "several"
    can_fuse = True
    key = "teachers"
    what = "several teachers"

    def __init__(self, teachers: Sequence, weights: Sequence[float], mode: str = "mixture", names=None):
        if mode not in ("mixture", "sum"):
            raise ValueError(f"unknown teacher mix {mode!r}; expected mixture or sum")
        if any(getattr(t, "cross_tokenizer", False) for t in teachers):
            mode = "sum"  # distributions over different vocabularies cannot be mixed: one loss per teacher
        self.teachers = list(teachers)
        self.weights = normalize_weights(weights)
        self.mode = mode
        self.name = " + ".join(names or [getattr(t, "name", "?") for t in self.teachers])
        ks = [t.top_k for t in self.teachers if getattr(t, "top_k", None)]
        self.top_k = max(ks) if ks else None  # set when any teacher is a cache
        self.offers = frozenset.intersection(*(t.offers for t in self.teachers)) & {"distribution", "any_sequence"}
        self.prefetches = any(t.prefetches for t in self.teachers)
        self.packs = all(t.packs for t in self.teachers)

    def prefetch(self, batch: dict) -> None:
        """Let the teachers that can (a served one) start on ``batch`` ahead of time."""
        for t in self.teachers:
            t.prefetch(batch)

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        if self.mode == "sum":
            return TeacherSignal(parts=[(w, t.signal(batch, hidden=hidden)) for w, t in zip(self.weights, self.teachers)])
        sigs = [t.signal(batch, hidden=False) for t in self.teachers]
        if self.top_k is None:  # all live: mix the full distributions
            return TeacherSignal(logits=mix_logprobs([torch.log_softmax(s.logits.float(), -1) for s in sigs], self.weights))
        topks = [s.topk if s.topk is not None else topk_of(torch.log_softmax(s.logits.float(), -1), self.top_k) for s in sigs]
        return TeacherSignal(topk=mix_topk(topks, self.weights, self.top_k))


    def refuse(self, need: str, method: str, hint: str = "") -> str:
        for t in self.teachers:  # the first teacher that cannot give it says why
            if need not in t.offers:
                return t.refuse(need, method, hint)
        return super().refuse(need, method, hint)

    def heldout(self, ho: HeldOut) -> dict:
        """The first figures one of the teachers without local weights has (e.g. a cache's stored ones)."""
        got = {"metrics": {}, "outputs": []}
        for t in self.teachers:
            if t.model is None:
                got = t.heldout(ho)
                if got.get("metrics"):
                    return got
        return got

    def unavailable(self, figures: dict) -> dict:
        for t in self.teachers:
            if t.model is None:
                return t.unavailable(figures)
        return {}

    def summary(self) -> dict:
        served = [t.summary() for t in self.teachers if t.summary()]
        return served[0] if served else {}


def signal_parts(signal: TeacherSignal) -> list[tuple[float, TeacherSignal]]:
    """``[(weight, signal)]``: the parts of a ``sum`` multi-teacher signal, or ``[(1.0, signal)]``."""
    parts = getattr(signal, "parts", None)
    return list(parts) if parts else [(1.0, signal)]
