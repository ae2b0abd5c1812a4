"""Divergences between a teacher P and a student Q given as log-probabilities, in one registry.

Each divergence is one function, registered by name with :func:`register`::

    @register("forward_kl")
    def forward_kl(x: Pair, grad: bool = False):
        p = x.lt.exp()
        return (p * (x.lt - x.ls)).sum(-1), (p.neg_() if grad else None)

It receives a :class:`Pair` (finite float32 log-probs ``x.lt = log P`` and ``x.ls = log Q``, both
``[N, V]``, the student's probabilities ``x.q`` ``[N, V]`` on demand, and the parameters ``x.beta``,
``x.skew``) and returns ``(D, g)``:

* ``D`` ``[N]``: the divergence of each row, summed over the vocabulary, written with
  differentiable torch operations (the plain path backpropagates through it);
* ``g`` ``[N, V]`` when ``grad`` is true, else None: the closed-form ``∂D/∂ls``, up to a multiple
  of Q per row (the softmax Jacobian the caller applies, ``∂D/∂z = g − Q·Σg``, cancels it). The
  fused path uses it instead of autograd; the tests hold it to autograd through ``D``.

With ``grad`` true no autograd graph is recorded (the fused path's forward), so a function may
update in place the tensors it built itself for ``g``; never ``x.lt``, ``x.ls`` or ``x.q``, which
autograd may have saved on the plain path and the caller reuses.

Registered, in this order (:data:`DIVERGENCES`):

* ``forward_kl``       KL(P‖Q)
* ``reverse_kl``       KL(Q‖P)
* ``jsd``              β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q (GKD). As in TRL's
                       ``generalized_jsd_loss``, β = 0 is forward KL and β = 1 reverse KL.
* ``skew_forward_kl``  KL(P‖αP + (1−α)Q)  (DistiLLM), α = ``skew``
* ``skew_reverse_kl``  KL(Q‖(1−α)P + αQ)
* ``tvd``              ½·Σ|P − Q|

Numerics: all math is float32; ``-inf`` log-probabilities (a masked vocabulary) are replaced by
``_LOG_FLOOR`` = -1e4 (:func:`_finite`), whose ``exp`` is exactly 0 in float32, so ``0·log 0``
terms are 0 and a token the student rules out but the teacher does not costs a large finite amount
instead of ``inf``. Finite values are never clamped.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["DIVERGENCES", "Pair", "divergence", "lookup", "register", "registered", "unregister"]

# -inf log-probs (masked vocabulary) become this; exp(_LOG_FLOOR) == 0 in float32.
_LOG_FLOOR = -1.0e4


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """Replace -inf (masked vocabulary) by ``_LOG_FLOOR``; finite values are left exactly as they are."""
    return torch.where(torch.isneginf(logp), _LOG_FLOOR, logp)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·A + (1−w)·B) ``[N, V]`` from finite log-probs ``[N, V]``, for w in [0, 1].

    At w = 0 or 1 one side gets weight log 0 = -inf: the value is exactly the other side, and both
    stay in the autograd graph (a loss that is identically 0 can still be backpropagated).
    """
    log_w = math.log(w) if w > 0.0 else -math.inf
    log_1mw = math.log1p(-w) if w < 1.0 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + log_1mw)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``Σ a·b``: ``[N, V]`` x ``[N, V]`` -> ``[N]``."""
    return (a * b).sum(-1)


class Pair:
    """What a divergence sees: teacher and student log-probs of the same rows, and the parameters.

    ``lt``, ``ls``: finite float32 log-probs ``[N, V]`` (P and Q); ``beta``: jsd's β; ``skew``:
    the skewed KLs' α; ``q``: ``ls.exp()`` ``[N, V]``, computed on first use unless given.
    """

    __slots__ = ("lt", "ls", "beta", "skew", "_q")

    def __init__(self, lt: torch.Tensor, ls: torch.Tensor, beta: float = 0.5, skew: float = 0.1,
                 q: Optional[torch.Tensor] = None):
        self.lt, self.ls, self.beta, self.skew, self._q = lt, ls, beta, skew, q

    @property
    def q(self) -> torch.Tensor:
        if self._q is None:
            self._q = self.ls.exp()
        return self._q


DivergenceFn = Callable[[Pair, bool], "tuple[torch.Tensor, Optional[torch.Tensor]]"]

_REGISTRY: dict[str, DivergenceFn] = {}


def register(name: str) -> Callable[[DivergenceFn], DivergenceFn]:
    """Decorator: register ``fn(x: Pair, grad: bool) -> (D [N], g [N, V] or None)`` as ``name``."""

    def deco(fn: DivergenceFn) -> DivergenceFn:
        if name in _REGISTRY:
            raise ValueError(f"divergence {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def unregister(name: str) -> None:
    """Remove a registered divergence (ValueError when there is none by that name)."""
    lookup(name)
    del _REGISTRY[name]


def registered() -> tuple[str, ...]:
    """Names of the registered divergences, in registration order."""
    return tuple(_REGISTRY)


def lookup(name: str) -> DivergenceFn:
    """The function registered as ``name``; ValueError listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown divergence {name!r}; expected one of {', '.join(_REGISTRY)}") from None


def __getattr__(name: str):
    if name == "DIVERGENCES":  # derived from the registry on every access
        return registered()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# the divergences: value D [N] and g = ∂D/∂ls [N, V] (up to a multiple of q per row)


@register("forward_kl")
def forward_kl(x: Pair, grad: bool = False):
    """KL(P‖Q) = Σ p·(lt − ls);  g = −p."""
    p = x.lt.exp()
    return _dot(p, x.lt - x.ls), (p.neg_() if grad else None)


@register("reverse_kl")
def reverse_kl(x: Pair, grad: bool = False):
    """KL(Q‖P) = Σ q·(ls − lt);  g = q·(ls − lt)  (+q)."""
    q = x.q
    r = (x.ls - x.lt) * q
    return r.sum(-1), (r if grad else None)


@register("jsd")
def jsd(x: Pair, grad: bool = False):
    """β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q;  g = (1−β)·q·(ls − lm)  (+ const·q).

    β = 0 is forward KL and β = 1 reverse KL (TRL's endpoints), not the degenerate mixtures.
    """
    b = x.beta
    if b == 0.0:
        return forward_kl(x, grad)
    if b == 1.0:
        return reverse_kl(x, grad)
    q = x.q
    lm = _log_mix(x.lt, x.ls, b)
    r = (x.ls - lm) * q
    return b * _dot(x.lt.exp(), x.lt - lm) + (1.0 - b) * r.sum(-1), (r.mul_(1.0 - b) if grad else None)


@register("skew_forward_kl")
def skew_forward_kl(x: Pair, grad: bool = False):
    """KL(P‖M), M = αP + (1−α)Q;  g = −(1−α)·p·q/m."""
    lm = _log_mix(x.lt, x.ls, x.skew)
    return _dot(x.lt.exp(), x.lt - lm), (torch.exp(x.lt + x.ls - lm).mul_(x.skew - 1.0) if grad else None)


@register("skew_reverse_kl")
def skew_reverse_kl(x: Pair, grad: bool = False):
    """KL(Q‖M), M = (1−α)P + αQ;  g = q·(ls − lm) − α·q²/m  (+q)."""
    q = x.q
    lm = _log_mix(x.ls, x.lt, x.skew)
    r = (x.ls - lm) * q
    return r.sum(-1), (r.sub_(torch.exp(2.0 * x.ls - lm).mul_(x.skew)) if grad else None)


@register("tvd")
def tvd(x: Pair, grad: bool = False):
    """½·Σ|q − p|;  g = ½·q·sign(q − p)."""
    q = x.q
    diff = x.lt.exp().neg_().add_(q) if grad else q - x.lt.exp()
    return 0.5 * diff.abs().sum(-1), (diff.sign_().mul_(q).mul_(0.5) if grad else None)


# ---------------------------------------------------------------------------------------------
# by name


def _divergence(kind: str, lt: torch.Tensor, ls: torch.Tensor, beta: float, skew: float, grad: bool = False,
                q: Optional[torch.Tensor] = None):
    """``(D [N], g [N, V] or None)`` of the divergence ``kind`` for finite log-probs ``lt``, ``ls`` ``[N, V]``.

    ``q``: ``ls.exp()`` ``[N, V]`` when the caller already has it.
    """
    return lookup(kind)(Pair(lt, ls, beta, skew, q), grad)


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher P and student Q given as log-probs ``[N, V]`` -> ``[N]`` (float32)."""
    return _divergence(kind, _finite(t_logp.float()), _finite(s_logp.float()), float(beta), float(skew))[0]
