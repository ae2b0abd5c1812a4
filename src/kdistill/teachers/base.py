"""What a teacher is: the class every teacher kind derives from, what it offers, and the kind registry.

A teacher turns a batch (``input_ids``/``attention_mask``/``labels`` ``[batch, seq]``) into a
:class:`TeacherSignal` (final hidden states + output layer for the fused loss, full logits, or
top-k log-probs), and/or writes and rates answers. Each kind *declares* what it offers (a subset
of :data:`OFFERS`); each method declares what it needs (``Method.teacher_needs``). The run checks
one against the other before training, and a kind says in one line why it cannot give what is
missing (:meth:`Teacher.refuse`).

A kind also knows how to report on itself: its held-out figures when the run has no local
teacher weights to measure (:meth:`Teacher.heldout`), the metrics it cannot give
(:meth:`Teacher.unavailable`), and its request figures (:meth:`Teacher.summary`).

Register a kind with :func:`register_teacher`: it has a ``name_of_kind`` (``teacher.kind: NAME`` selects it
explicitly, its settings under ``teacher.options``), it ``accepts(spec)`` a ``teacher:`` config
section and ``build(spec, key, env)``\\ s the teacher; without ``kind:``, kinds are tried by
``priority`` (lowest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kdistill.losses import TopK

#: What a teacher can give, and how the run names it in messages.
OFFERS = {
    "distribution": "the teacher's token distributions",
    "any_sequence": "the teacher's token distributions on new sequences (the student's samples)",
    "hidden_states": "the teacher's hidden states",
    "weights": "a live teacher model (teacher.model)",
    "text": "the teacher's written answers",
    "judge": "the teacher's ratings of answers",
}


@dataclass
class TeacherSignal:
    """One of: ``hidden`` ``[batch, seq, hidden]`` + ``weight`` ``[vocab, hidden]``; ``logits``
    ``[batch, seq, vocab]``; or ``topk`` (:class:`~kdistill.losses.TopK`, ``[batch, seq, k]``);
    or ``parts``: ``[(weight, TeacherSignal)]``, a weighted sum of per-teacher losses
    (several teachers, ``loss.teacher_mix: sum``; see :func:`kdistill.teachers.multi.signal_parts`);
    or ``cross``: a teacher with another tokenizer, aligned to the student's positions
    (:class:`~kdistill.losses.cross_tokenizer.CrossTarget`, :mod:`kdistill.teachers.cross`)."""

    hidden: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    topk: Optional[TopK] = None
    parts: Optional[list] = None
    features: Optional[dict] = None  # {teacher block: its output [batch, seq, hidden]} (feature distillation)
    cross: Optional[Any] = None  # a CrossTarget (loss.cross_tokenizer)


@dataclass
class HeldOut:
    """What a teacher needs to report its own held-out figures (see :meth:`Teacher.heldout`)."""

    cfg: Any
    rows: list
    feats: list
    out: Path
    pad_id: int = 0
    say: Callable[[str], None] = print
    keep: Optional[Path] = None  # a file for figures that cost requests (a rerun reads them back)


def placeholder_topk(B: int, S: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [B, S, k], logprobs [B, S, k])`` for positions without a label (never read by a loss)."""
    return (torch.arange(k, dtype=torch.long).expand(B, S, k).clone(),
            torch.full((B, S, k), -float(torch.log(torch.tensor(float(k)))), dtype=torch.float32))


class Teacher:
    """Base class of every teacher kind (see the module docstring)."""

    name_of_kind = "?"  # what ``teacher.kind`` calls it
    kind = "?"  # the report's teacher.kind: local, cache, api or several
    offers: frozenset = frozenset()
    priority = 100  # kinds are tried in this order when a config section is built
    model = None  # the teacher's local weights, when it has them
    tokenizer = None  # the teacher's own tokenizer, when it has one here
    can_fuse = False  # its signal works with the student's fused (hidden-state) loss path
    prefetches = False  # has prefetch(): can start on a batch before it is needed
    packs = False  # scores packed batches (train.batching: packed; see kdistill.batching)
    key = "teacher"  # its config key in messages (teacher, teachers[i])
    name = "teacher"
    what = "this teacher"  # how a refusal names it ("an offline cache", ...)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def accepts(cls, spec) -> bool:
        """Whether this kind serves the ``teacher:`` section ``spec``."""
        return False

    @classmethod
    def build(cls, spec, key: str, env) -> "Teacher":
        """The teacher for ``spec`` (``env``: :class:`kdistill.teachers.build.BuildEnv`)."""
        raise NotImplementedError

    # -- signal ------------------------------------------------------------------------------

    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        raise NotImplementedError(f"{self.key}: {self.what} gives no token-level signal")

    def prefetch(self, batch: dict) -> None:
        """Start on ``batch`` ahead of time (kinds with ``prefetches``)."""

    @property
    def text(self):
        """The teacher as a writer of text (``answer``, ``rate``) when that goes over an API, else None."""
        return None

    # -- reporting ---------------------------------------------------------------------------

    def heldout(self, ho: HeldOut) -> dict:
        """Held-out figures ``{"metrics", "outputs"}`` when the run has no local teacher weights."""
        return {"metrics": {}, "outputs": []}

    def unavailable(self, figures: dict) -> dict:
        """``{metric: why}`` for what cannot be measured with this teacher."""
        return {}

    def describe(self) -> dict:
        """The report's ``teacher`` entry (without metrics)."""
        return {"name": self.name, "params": None, "kind": self.kind}

    def summary(self) -> dict:
        """Request figures and the like for the method's report section."""
        return {}

    def refuse(self, need: str, method: str, hint: str = "") -> str:
        """One line: why this teacher cannot give ``need`` to ``method``."""
        if need == "hidden_states":
            return ("features: feature distillation needs one live teacher model (teacher.model), not "
                    f"{self.what}")
        return f"{self.key}: method {method} needs {OFFERS.get(need, need)}, which {self.what} does not give" + (
            f"; {hint}" if hint else "")


# ---------------------------------------------------------------------------------------------
# the kind registry

_KINDS: list[type[Teacher]] = []


def register_teacher(cls: type[Teacher]) -> type[Teacher]:
    """Class decorator: ``cls.accepts(spec)`` claims config sections, ``cls.build`` makes teachers."""
    if cls not in _KINDS:
        _KINDS.append(cls)
    return cls


def unregister_teacher(cls: type[Teacher]) -> None:
    if cls in _KINDS:
        _KINDS.remove(cls)


def teacher_kinds() -> list[type[Teacher]]:
    return sorted(_KINDS, key=lambda k: k.priority)


def kind_for(spec) -> Optional[type[Teacher]]:
    """The kind that serves ``spec``: the one named by ``spec.kind``, else the first that accepts it."""
    if getattr(spec, "kind", None) is not None:
        return next((k for k in _KINDS if k.name_of_kind == spec.kind), None)
    return next((k for k in teacher_kinds() if k.accepts(spec)), None)


def kind_names() -> list[str]:
    return [k.name_of_kind for k in teacher_kinds()]


@dataclass
class BuildEnv:
    """What building a teacher may use (made by the run)."""

    cfg: Any
    tokenizer: Any  # the student's
    vocab_size: int
    features: list = field(default_factory=list)  # the encoded training rows (a cache is checked against them)
    device: Any = None
    say: Callable[[str], None] = print
    weights: Any = None  # the primary teacher's (model, tokenizer), loaded by the run, or None
    student: Any = None  # the student model (its output layer's size)
    primary: Any = None  # the primary teacher's config section
    needs: frozenset = frozenset()  # what the method needs of the teacher
    method: str = ""
    rows: list = field(default_factory=list)  # the training rows (Example), e.g. for a teacher that re-tokenizes them
