"""Batched generation shared by evaluation, teacher answers and the sampling methods.

:func:`sample_completions` is the one generation loop (left padding, KV cache, eval mode): it
returns each completion's *token ids*, cut after the first end-of-sequence token (EOS kept, what
follows dropped). :func:`kdistill.evaluate.generate` decodes them to text.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from kdistill.data import collate_prompts


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a (DDP-wrapped) :class:`~kdistill.methods.base.StudentLM`."""
    m = getattr(model, "module", model)
    inner = getattr(m, "model", None)
    return inner if inner is not None and hasattr(inner, "generate") and not hasattr(m, "generate") else m


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


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 8,
    num_samples: int = 1,
    device=None,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Completion ids for each prompt (``num_samples`` consecutive entries per prompt).

    ``temperature`` 0 is greedy; otherwise plain ancestral sampling from ``softmax(logits / T)``
    (top-k/top-p off, so the samples follow the model's own distribution). Each completion ends
    with its EOS when the model produced one within ``max_new_tokens``; ``min_new_tokens`` forbids
    an EOS before that many tokens (used to time generation of a fixed length).
    """
    hf = hf_model(model)
    device = device or next(hf.parameters()).device
    was_training = hf.training
    hf.eval()
    pad = tokenizer.pad_token_id
    eos = eos_ids(hf, tokenizer)
    out: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            b = collate_prompts(chunk, pad)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                          num_return_sequences=num_samples)
            if min_new_tokens:
                kwargs["min_new_tokens"] = min_new_tokens
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            gen = hf.generate(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), **kwargs)
            for row in gen[:, b["input_ids"].shape[1]:].tolist():
                out.append(cut_at_eos(row, eos))
    finally:
        hf.train(was_training)
    return out


class HFSampler:
    """Student sampling with transformers (``engine: transformers``): :func:`sample_completions` on
    whatever model is passed, so it always sees the current weights. The same call shape as
    :class:`kdistill.vllm_engine.VllmSampler`."""

    def __init__(self, tokenizer, batch_size: int = 8):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.stats: dict = {}

    def mark_stale(self) -> None:
        """Nothing to do: generation runs on the live model."""

    def __call__(self, model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 num_samples: int = 1) -> list[list[int]]:
        return sample_completions(model, self.tokenizer, prompts, max_new_tokens, temperature, self.batch_size,
                                  num_samples=num_samples)


def make_sampler(engine: str, key: str, ctx, model: nn.Module, batch_size: int):
    """The student sampler a method's ``engine`` setting asks for (``key`` names it in errors)."""
    if engine == "vllm":
        from pathlib import Path

        from kdistill.vllm_engine import VllmSampler

        return VllmSampler(model, ctx.tokenizer, Path(ctx.output_dir) / "vllm_student", ctx.cfg.vllm, key,
                           seed=ctx.cfg.train.seed, max_model_len=ctx.cfg.data.max_length)
    return HFSampler(ctx.tokenizer, batch_size)
