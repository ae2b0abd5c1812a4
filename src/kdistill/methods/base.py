"""The method interface and the context a method is built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.generation import hf_model
from kdistill.losses import label_logprobs
from kdistill.teachers.local import block_outputs, decoder_states, final_hidden, supports_hidden


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
    student: Any = None  # the student model before training (its config, e.g. for feature layer maps)
    extra: dict = field(default_factory=dict)


class StudentLM(nn.Module):
    """Wraps a causal LM so one ``forward`` returns either logits or (hidden, output weight).

    Wrapping (rather than calling ``model.get_decoder()`` from the loss) keeps the forward inside
    the module that accelerate/DDP prepares, so gradient synchronisation works on many GPUs. Modules
    trained beside the student but not part of it (feature adapters) ride along as ``extra``: they
    are optimized and checkpointed with it, and left out of the saved student.
    """

    def __init__(self, model: nn.Module, extra: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.extra = extra
        self.can_fuse = supports_hidden(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False,
                feature_layers=None):
        """``hidden``: ``(final hidden [B, T, H], output weight [V, H])``, else logits ``[B, T, V]``;
        with ``feature_layers``, one more item: ``{block i: its output [B, T, H]}``."""
        if hidden:
            if not self.can_fuse:
                raise RuntimeError("this model's logits are not hidden @ W.T; use the plain path")
            w = self.model.get_output_embeddings().weight
            if feature_layers:
                h, feats = decoder_states(self.model, input_ids, attention_mask, feature_layers)
                return h, w, feats
            return final_hidden(self.model, input_ids, attention_mask), w
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=bool(feature_layers))
        if feature_layers:
            return out.logits, block_outputs(out.hidden_states, feature_layers)
        return out.logits


def model_label_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor, vocab_size: int, chunk_size="auto") -> torch.Tensor:
    """``[batch, seq]`` float32 log-probabilities of the (aligned) labels under ``model``; 0 at -100.

    ``model`` is a :class:`StudentLM` (possibly DDP-wrapped) or a plain causal LM. When its logits
    are ``hidden @ W.T`` the vocabulary projection is chunked (:func:`kdistill.losses.label_logprobs`:
    no ``[tokens x vocab]`` tensor); otherwise the model's logits are used as they are.
    """
    inner = getattr(model, "module", model)
    if isinstance(inner, StudentLM):
        if inner.can_fuse:
            h, w = model(input_ids, attention_mask, hidden=True)
            return label_logprobs(h, w[:vocab_size], labels, chunk_size)
        logits = model(input_ids, attention_mask)[..., :vocab_size]
    else:
        hf = hf_model(model)
        if supports_hidden(hf):
            h = final_hidden(hf, input_ids, attention_mask)
            return label_logprobs(h, hf.get_output_embeddings().weight[:vocab_size], labels, chunk_size)
        logits = hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[..., :vocab_size]
    mask = labels != IGNORE_INDEX
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


class Method:
    """Base class: supervised on the batch's own labels (cross-entropy). Override :meth:`loss`."""

    name = "base"
    looks_ahead = False  # True: the trainer hands over the next step's micro-batches early (lookahead)

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def trainable_modules(self) -> Optional[nn.Module]:
        """Modules the method trains beside the student (e.g. feature adapters); None = none."""
        return None

    def train_features(self) -> Optional[list[dict]]:
        """Encoded training rows; None = the dataset's rows as they are."""
        return None

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
