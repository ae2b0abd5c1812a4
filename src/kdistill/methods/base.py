"""What a distillation method is: the class every method derives from, and the method registry.

A method decides which sequences the student trains on and with which loss. It *declares* what it
needs, so that the config, the run and the teachers ask it instead of keeping lists of names:

==================  ==========================================================================
``name``            the ``method:`` value that selects it
``sections``        its config sections ``{name: Section class}`` (e.g. ``{"on_policy": ...}``)
``needs_responses`` trains on the dataset's responses (False: prompt-only rows are fine)
``single_pass``     one pass of the shared trainer (curriculum and ``eval.every`` apply); a
                    multi-pass method overrides :meth:`Method.fit` and runs its own stages
``uses_loss``       the ``loss:`` divergence settings apply (named in the run's messages)
``uses_features``   a ``features:`` (hidden-state) term may be added to its loss
``shares_vocab``    teacher and student must tokenize alike (token-level signal)
``loss_defaults``   ``loss:`` keys it sets unless the config does (e.g. GKD's jsd)
``teacher_needs``   what it needs of the teacher, from the config: a subset of
                    :data:`kdistill.teachers.base.OFFERS` (empty: a teacher is optional)
``check_config``    its own config rules (raise ``ValueError`` with the key and the fix)
``packs``           its loss is right on packed rows (``train.batching: packed``, see
                    :mod:`kdistill.batching`): it reads batches through the model and the teacher only
==================  ==========================================================================

Per micro-batch the trainer asks a method :meth:`Method.prepare_batch`, :meth:`Method.num_items`
(the global count the loss averages over) and :meth:`Method.loss`.

Register with :func:`register` (a class decorator); ``method: NAME`` then selects it, its sections
join the config schema, and ``kdistill run`` runs it through the same phases as every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.models.student import model_label_logprobs


@dataclass
class RunContext:
    """Everything a method may need, built once by the run."""

    cfg: Any  # the validated config (kdistill.config.schema())
    tokenizer: Any  # the student's
    teacher: Any  # a kdistill.teachers.base.Teacher, or None
    vocab_size: int
    output_dir: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    renderer: Any = None
    train_examples: list = field(default_factory=list)
    student: Any = None  # the student model before training (its config, e.g. for feature layer maps)
    extra: dict = field(default_factory=dict)


class Method:
    """Base class: supervised on the batch's own labels (cross-entropy). Override :meth:`loss`."""

    name = "base"
    sections: dict = {}
    needs_responses = True
    single_pass = True
    uses_loss = False
    uses_features = False
    shares_vocab = True
    loss_defaults: dict = {}
    looks_ahead = False  # True: the trainer hands over the next step's micro-batches early (lookahead)
    packs = False  # True: the loss is right on packed rows (train.batching: packed)

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    # -- declarations (class level, asked before any model loads) ------------------------------

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        """What this method needs of the teacher with this config (see ``OFFERS``)."""
        return frozenset()

    @classmethod
    def check_config(cls, cfg) -> None:
        """Method-specific config rules; raise ``ValueError("key: what is wrong")``."""

    @classmethod
    def rows_after_teacher(cls, cfg) -> bool:
        """Whether :meth:`training_rows` needs the teacher (e.g. sequence's ``generate:``): then the run
        asks for the rows after loading it, else before anything is written."""
        return False

    @classmethod
    def training_rows(cls, run) -> tuple[list, list]:
        """``(train rows, held-out rows)``; by default the ``data:`` rows (``run.read_rows()``)."""
        return run.read_rows()

    # -- per run ---------------------------------------------------------------------------

    def trainable_modules(self) -> Optional[nn.Module]:
        """Modules the method trains beside the student (e.g. feature adapters); None = none."""
        return None

    def train_features(self) -> Optional[list[dict]]:
        """Encoded training rows; None = the dataset's rows as they are."""
        return None

    def eval_rows(self, rows: list) -> list:
        """The held-out rows as the student is prompted with them (e.g. with a task prefix)."""
        return rows

    def prepare_batch(self, batch: dict, model: nn.Module) -> dict:
        """Hook to replace or extend a batch before the loss (e.g. with student samples)."""
        return batch

    def lookahead(self, batches: list[dict]) -> None:
        """With ``looks_ahead``: the next optimizer step's micro-batches (as they come from the data,
        before :meth:`prepare_batch`), given while this step trains, so that slow work for them (a
        served teacher's log-probs) can start early. It must not change what they will compute."""

    def num_items(self, batch: dict) -> int:
        """What the loss is averaged over: here, trained tokens (labels != -100)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict, num_items) -> tuple[torch.Tensor, dict]:
        """Loss for one micro-batch, already divided by ``num_items`` (global count): here the
        cross-entropy of the labelled tokens (chunked over the vocabulary when the head allows)."""
        lp = model_label_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  self.ctx.vocab_size, self.ctx.cfg.loss.chunk_size)
        return -lp.sum() / num_items, {}

    def describe(self) -> str:
        """How the run names this training in its log line."""
        if self.uses_loss:
            lc = self.ctx.cfg.loss
            return f"{self.name}, {lc.divergence}, T={lc.temperature}, alpha={lc.alpha}"
        return self.name

    def summary(self) -> dict:
        """Method-specific figures for the report."""
        return {}

    def report_extras(self) -> dict:
        """Top-level ``report.json`` entries this method adds (e.g. sequence's ``filters``)."""
        return {}

    def fit(self, student: nn.Module, stages) -> Optional[tuple[nn.Module, dict]]:
        """Multi-pass hook: train ``student`` in several trainer passes (stages).

        ``stages`` is a :class:`kdistill.stages.StageRunner` (``stages.train(...)`` runs the shared
        trainer on any features and output folder). Return ``(trained student, training summary)``;
        the default ``None`` means one ordinary pass of the trainer with this method.
        """
        return None


# ---------------------------------------------------------------------------------------------
# the registry

_REGISTRY: dict[str, type[Method]] = {}
_VERSION = [0]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: ``method: cls.name`` selects ``cls``; its ``sections`` join the config schema."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name in ("", "base"):
        raise TypeError("register a Method subclass with its own `name`")
    _REGISTRY[cls.name] = cls
    _VERSION[0] += 1
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    if _REGISTRY.pop(name, None) is not None:
        _VERSION[0] += 1


def method_names() -> list[str]:
    return list(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def method_sections() -> dict[str, type]:
    """Every registered method's config sections (a section shared by two methods is one class)."""
    out: dict[str, type] = {}
    for m in _REGISTRY.values():
        for key, cls in m.sections.items():
            if out.setdefault(key, cls) is not cls:
                raise TypeError(f"config section {key!r} is declared twice with different classes")
    return out


def registry_version() -> int:
    """Changes whenever a method is (un)registered (the config schema is rebuilt then)."""
    return _VERSION[0]


def build_method(name: str, ctx: RunContext) -> Method:
    """An instance of ``method: name`` for this run (its constructor checks what it was given)."""
    return method_class(name)(ctx)
