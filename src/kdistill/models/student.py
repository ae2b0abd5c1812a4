"""The student during training: one wrapper the trainer prepares, and saving/loading stage models.

:class:`StudentLM` lets one ``forward`` return either logits or ``(final hidden, output weight)`` so
the fused losses never need ``[tokens, vocab]`` logits; :func:`model_label_logprobs` is the
cross-entropy / log-likelihood of labels for any model (chunked when the head allows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.losses import label_logprobs
from kdistill.models.introspect import (block_outputs, decoder_states, final_hidden, forward_inputs, hf_model,
                                       supports_hidden)
from kdistill.models.lora import is_lora, load_adapter_copy
from kdistill.store import on_main


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
        out = self.model(**forward_inputs(input_ids, attention_mask), use_cache=False,
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
        logits = hf(**forward_inputs(input_ids, attention_mask), use_cache=False).logits[..., :vocab_size]
    mask = labels != IGNORE_INDEX
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def save_model(model: nn.Module, folder: Path) -> None:
    """Save a stage's model (main process; every process waits, then may :func:`load_saved` it)."""
    on_main(lambda: hf_model(model).save_pretrained(str(folder)))


def load_saved(like: nn.Module, folder: Path) -> nn.Module:
    """A model saved by :func:`save_model`, same class, dtype and device as ``like`` (a LoRA
    student: a copy of ``like`` with the saved adapters)."""
    if is_lora(like):
        return load_adapter_copy(like, folder)
    p = next(like.parameters())
    model = type(like).from_pretrained(str(folder), dtype=p.dtype)
    return model.to(p.device).eval()
