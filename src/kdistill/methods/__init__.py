"""Distillation methods. A method decides which sequences are trained on and which loss.

The trainer (``kdistill.trainer``) is the same for every method. It asks a method three things
per micro-batch: :meth:`Method.prepare_batch` (e.g. replace the batch with student samples),
:meth:`Method.num_items` (how many tokens/sequences the loss averages over, summed across the
whole optimizer step and all processes by the trainer), and :meth:`Method.loss`.

Register a new method with :func:`register`; ``method: NAME`` in a config selects it.
"""

from __future__ import annotations

from typing import Callable

from kdistill.methods.base import Method, RunContext

_REGISTRY: dict[str, Callable[[RunContext], Method]] = {}


def register(name: str, needs_responses: bool = True):
    """``needs_responses=False``: the method writes its own answers, so prompt-only rows are fine."""

    def deco(factory):
        _REGISTRY[name] = factory
        factory.needs_responses = needs_responses
        return factory

    return deco


def needs_responses(name: str) -> bool:
    """Whether ``method: name`` trains on the dataset's responses (unknown names: True)."""
    _load_builtin()
    return getattr(_REGISTRY.get(name), "needs_responses", True)


def build_method(name: str, ctx: RunContext) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name](ctx)


def _load_builtin() -> None:
    from kdistill.methods import logit  # noqa: F401
    from kdistill.methods import sequence  # noqa: F401  (issue 4)
    from kdistill.methods import dpo, on_policy, rounds, zephyr  # noqa: F401  (issue 6)
    from kdistill.methods import progressive  # noqa: F401


__all__ = ["Method", "RunContext", "build_method", "register"]
