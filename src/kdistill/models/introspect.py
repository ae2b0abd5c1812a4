"""What kdistill needs to know about a causal LM, for any architecture transformers loads.

* :func:`supports_hidden` — are its logits exactly ``final_hidden @ lm_head.weight.T``? (then the
  losses can project chunk by chunk instead of materializing ``[tokens, vocab]``);
* :func:`final_hidden`, :func:`decoder_states`, :func:`block_outputs` — hidden states without the
  logits, and block outputs for feature distillation;
* :func:`decoder_layers`, :func:`num_layers`, :func:`output_vocab_size`, :func:`count_params`;
* :func:`hf_model` — the Hugging Face model inside kdistill's / DDP's wrappers;
* :func:`eos_ids`, :func:`cut_at_eos` — which tokens end an answer, and a completion cut after one.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from kdistill.errors import ModelError

# Config attributes of architectures whose logits are not a plain ``hidden @ W.T``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a (DDP-wrapped) :class:`~kdistill.models.student.StudentLM`."""
    m = getattr(model, "module", model)
    inner = getattr(m, "model", None)
    return inner if inner is not None and hasattr(inner, "generate") and not hasattr(m, "generate") else m


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


def packed_positions(segments: torch.Tensor) -> torch.Tensor:
    """``position_ids`` ``[rows, width]`` restarting at 0 wherever ``segments`` (a packed batch's
    ``attention_mask``: sequence number per token, 0 = padding) changes within a row."""
    t = torch.arange(segments.shape[-1], device=segments.device).expand_as(segments)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.cummax(torch.where(start, t, torch.zeros_like(t)), dim=-1).values


def forward_inputs(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> dict:
    """Keyword arguments of a transformers forward for a batch. A packed batch (see
    :mod:`kdistill.batching`: ``attention_mask`` holds sequence numbers above 1) becomes per-sequence
    ``position_ids`` and no 2-D mask, from which transformers keeps the sequences apart
    (flash-attention's variable-length kernel, or a block-diagonal causal mask)."""
    if (attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.numel()
            and int(attention_mask.max()) > 1):
        return {"input_ids": input_ids, "attention_mask": None, "position_ids": packed_positions(attention_mask)}
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states ``[batch, seq, hidden]`` without computing the logits."""
    out = model.get_decoder()(**forward_inputs(input_ids, attention_mask), use_cache=False)
    return out.last_hidden_state


def block_outputs(hidden_states, layers) -> dict:
    """``{block i: output of block i}`` from a model's ``hidden_states`` tuple (embeddings first)."""
    return {i: hidden_states[i + 1] for i in layers}


def decoder_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers) -> tuple:
    """``(final hidden [batch, seq, hidden], {block i: output of block i [batch, seq, hidden]})``."""
    out = model.get_decoder()(**forward_inputs(input_ids, attention_mask), use_cache=False,
                              output_hidden_states=True)
    return out.last_hidden_state, block_outputs(out.hidden_states, layers)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``model.model.layers`` or ``.h``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"cannot find the decoder blocks of {type(model).__name__} to cut a student from")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def output_vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the model's generation EOS(s)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    g = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(g, int):
        ids.add(g)
    elif isinstance(g, (list, tuple)):
        ids.update(int(x) for x in g)
    return sorted(ids)


def cut_at_eos(tokens: Sequence[int], eos: Iterable[int]) -> list[int]:
    """Tokens up to and including the first EOS; everything after it (padding, junk) is dropped."""
    eos = set(eos)
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos:
            break
    return out


def carry_rest(model: nn.Module, new: nn.Module, key: str) -> nn.Module:
    """Finish a model rebuilt from ``model`` (pruned, made dense): copy its buffers (rotary tables,
    ...) and generation config, match its dtype and train/eval mode. A buffer that does not fit is a
    ``ModelError`` naming ``key``."""
    bufs = dict(model.named_buffers())
    for name, b in new.named_buffers():
        if name not in bufs or bufs[name].shape != b.shape:
            raise ModelError(f"{key}: cannot carry buffer {name} of {type(model).__name__}")
        b.copy_(bufs[name])
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.to(next(model.parameters()).dtype).train(model.training)

