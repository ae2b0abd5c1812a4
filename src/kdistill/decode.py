"""A lean sampling loop for transformers causal LMs: finished rows leave the batch.

``model.generate`` keeps every row of a batch until the last one ends: a row that wrote its EOS
after 3 tokens is still run (and its KV cache grown) for the other rows' 60 more. This loop drops a
row, and its KV cache rows, as soon as it ends, and does without generate's per-step machinery
(logits processors, stopping criteria, output bookkeeping). The prompt is read once (left-padded,
per-row positions), then one token per step with a dynamic KV cache.

A *static* KV cache (transformers' ``StaticCache``) pays off with ``torch.compile`` (fixed shapes,
CUDA graphs); without it, every step attends over the whole preallocated length and rows cannot
leave the batch, so this loop keeps the dynamic cache (``benchmarks/on_policy_speed.py`` measures
both against ``generate`` on CPU).

Sampling is plain ancestral sampling from ``softmax(logits / T)`` with the global torch RNG (or
greedy at T = 0), as ``generate(do_sample=True, top_k=0, top_p=1)``; the random draws differ from
generate's (rows leave the batch), the distribution does not.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from kdistill.throughput import clock, linear_params


def _cache_arg(model: nn.Module):
    """The name of ``model.forward``'s KV-cache argument (``cache`` from transformers 5.x, before it
    ``past_key_values``), or None."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if not all(p in params for p in ("position_ids", "attention_mask", "use_cache")):
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def supports_lean_loop(model: nn.Module) -> bool:
    """True for a transformers causal LM whose forward takes a KV cache and per-row positions."""
    return _cache_arg(model) is not None and hasattr(model, "config")


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           eos: list[int], temperature: float = 1.0, min_new_tokens: int = 0) -> list[list[int]]:
    """Completion ids per row of a left-padded batch ``input_ids``/``attention_mask`` ``[rows, width]``
    (each ends with its EOS when one came within ``max_new_tokens``; EOS is forbidden before
    ``min_new_tokens``)."""
    rows = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows, device=input_ids.device)
    eos_t = torch.tensor(sorted(set(eos)), device=input_ids.device, dtype=torch.long)
    mask = attention_mask.long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    kv = {_cache_arg(model): cache}
    per_token = 2 * linear_params(model)
    clock.add_flops(per_token * int(mask.sum()))
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kv["logits_to_keep"] = 1  # the prompt's last position only
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **kv).logits[:, -1]
    kv.pop("logits_to_keep", None)
    last = pos[:, -1]
    for step in range(max_new_tokens):
        logits = logits.float()
        if step < min_new_tokens and eos_t.numel():
            logits[:, eos_t] = float("-inf")
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        for r, t in zip(alive.tolist(), nxt.tolist()):
            out[r].append(t)
        done = torch.isin(nxt, eos_t) if eos_t.numel() else torch.zeros_like(nxt, dtype=torch.bool)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):  # finished rows leave the batch, with their cache rows
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, nxt, mask, last = alive[keep], nxt[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        last = last + 1
        clock.add_flops(per_token * int(nxt.numel()))
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                       **kv).logits[:, -1]
    return out
