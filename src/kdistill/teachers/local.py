"""A teacher model loaded next to the student (frozen, no gradients)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kdistill.losses import TopK

# Config attributes of architectures whose logits are not a plain ``hidden @ W.T``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def supports_hidden(model: nn.Module) -> bool:
    """True when ``logits == decoder(x).last_hidden_state @ lm_head.weight.T`` exactly."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None or not hasattr(model, "get_decoder"):
        return False
    cfg = getattr(model, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        v = getattr(cfg, attr, None)
        if v not in (None, 1, 1.0, 0, 0.0, False):
            return False
    return True


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states ``[batch, seq, hidden]`` without computing the logits."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def block_outputs(hidden_states, layers) -> dict:
    """``{block i: output of block i}`` from a model's ``hidden_states`` tuple (embeddings first)."""
    return {i: hidden_states[i + 1] for i in layers}


def decoder_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers) -> tuple:
    """``(final hidden [batch, seq, hidden], {block i: output of block i [batch, seq, hidden]})``."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              output_hidden_states=True)
    return out.last_hidden_state, block_outputs(out.hidden_states, layers)


@dataclass
class TeacherSignal:
    """One of: ``hidden`` ``[batch, seq, hidden]`` + ``weight`` ``[vocab, hidden]``; ``logits``
    ``[batch, seq, vocab]``; or ``topk`` (:class:`~kdistill.losses.TopK`, ``[batch, seq, k]``);
    or ``parts``: ``[(weight, TeacherSignal)]``, a weighted sum of per-teacher losses
    (several teachers, ``loss.teacher_mix: sum``; see :func:`kdistill.teachers.multi.signal_parts`)."""

    hidden: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    topk: Optional[TopK] = None
    parts: Optional[list] = None
    features: Optional[dict] = None  # {teacher block: its output [batch, seq, hidden]} (feature distillation)


class LocalTeacher:
    """A frozen causal LM run on each batch.

    Args:
        model: the teacher (moved to ``device``, eval mode, gradients off).
        vocab_size: shared vocabulary size (a padded output layer is sliced to it).
        name: shown in reports.
    """

    def __init__(self, model: nn.Module, vocab_size: int, name: str = "teacher", device=None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.vocab_size = vocab_size
        self.name = name
        self.can_fuse = supports_hidden(model)

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        """The teacher on ``batch``: final hidden states and output weight (``hidden`` and the head
        allows it) or logits; with ``feature_layers``, also those blocks' outputs (same forward)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if hidden and self.can_fuse:
            w = self.model.get_output_embeddings().weight[: self.vocab_size]
            if feature_layers:
                h, feats = decoder_states(self.model, ids, mask, feature_layers)
                return TeacherSignal(hidden=h, weight=w, features=feats)
            return TeacherSignal(hidden=final_hidden(self.model, ids, mask), weight=w)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False,
                         output_hidden_states=bool(feature_layers))
        feats = block_outputs(out.hidden_states, feature_layers) if feature_layers else None
        return TeacherSignal(logits=out.logits[..., : self.vocab_size], features=feats)
