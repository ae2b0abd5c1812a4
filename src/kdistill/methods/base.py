"""The method interface and the context a method is built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.teachers.local import final_hidden, supports_hidden


@dataclass
class RunContext:
    """Everything a method may need, built once by the pipeline."""

    cfg: Any  # kdistill.config.Config
    tokenizer: Any
    teacher: Any  # a teacher (LocalTeacher, cache, ...) or None
    vocab_size: int
    output_dir: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    renderer: Any = None
    train_examples: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class StudentLM(nn.Module):
    """Wraps a causal LM so one ``forward`` returns either logits or (hidden, output weight).

    Wrapping (rather than calling ``model.get_decoder()`` from the loss) keeps the forward inside
    the module that accelerate/DDP prepares, so gradient synchronisation works on many GPUs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.can_fuse = supports_hidden(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False):
        if hidden:
            if not self.can_fuse:
                raise RuntimeError("this model's logits are not hidden @ W.T; use the plain path")
            return final_hidden(self.model, input_ids, attention_mask), self.model.get_output_embeddings().weight
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class Method:
    """Base class: supervised on the batch's own labels (cross-entropy). Override :meth:`loss`."""

    name = "base"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def train_features(self) -> Optional[list[dict]]:
        """Encoded training rows; None = the dataset's rows as they are."""
        return None

    def prepare_batch(self, batch: dict, model: nn.Module) -> dict:
        """Hook to replace or extend a batch before the loss (e.g. with student samples)."""
        return batch

    def num_items(self, batch: dict) -> int:
        """What the loss is averaged over: here, trained tokens (labels != -100)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict, num_items) -> tuple[torch.Tensor, dict]:
        """Loss for one micro-batch, already divided by ``num_items`` (global count)."""
        from kdistill.losses import cross_entropy_sum

        logits = model(batch["input_ids"], batch["attention_mask"])
        return cross_entropy_sum(logits, batch["labels"]) / num_items, {}

    def summary(self) -> dict:
        """Method-specific figures for the report."""
        return {}

    def fit(self, student: nn.Module, runner) -> Optional[tuple[nn.Module, dict]]:
        """Multi-pass hook: train ``student`` in several trainer passes (rounds, stages).

        ``runner`` is a :class:`kdistill.stages.StageRunner` (``runner.train(...)`` runs the shared
        trainer on any features and output folder). Return ``(trained student, training summary)``;
        the default ``None`` means one ordinary pass of the trainer with this method.
        """
        return None
