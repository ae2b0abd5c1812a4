"""Sampling from a model: the one generation loop, and the student samplers of the methods.

:func:`sample_completions` is the one generation loop (left padding, KV cache, eval mode; rows that end
leave the batch, :mod:`kdistill.decode`): it
returns each completion's *token ids*, cut after the first end-of-sequence token (EOS kept, what
follows dropped). :func:`sample_texts` decodes them. :func:`make_sampler` gives a method the
sampler its ``engine`` setting asks for: :class:`HFSampler` (transformers) or a colocated vLLM
engine (:class:`kdistill.vllm_engine.VllmSampler`), both with one call shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdistill.data import collate_prompts
from kdistill.decode import decode, supports_lean_loop
from kdistill.throughput import clock, linear_params
from kdistill.models.introspect import cut_at_eos, eos_ids, hf_model
from kdistill.vllm_engine import VllmSampler


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
    lean_loop: bool = True,
) -> list[list[int]]:
    """Completion ids for each prompt (``num_samples`` consecutive entries per prompt).

    ``temperature`` 0 is greedy; otherwise plain ancestral sampling from ``softmax(logits / T)``
    (top-k/top-p off, so the samples follow the model's own distribution). Each completion ends
    with its EOS when the model produced one within ``max_new_tokens``; ``min_new_tokens`` forbids
    an EOS before that many tokens (used to time generation of a fixed length). ``lean_loop``: with a
    model that allows it, :func:`kdistill.decode.decode` (finished rows leave the batch) instead of
    ``generate``.
    """
    hf = hf_model(model)
    device = device or next(hf.parameters()).device
    was_training = hf.training
    hf.eval()
    pad = tokenizer.pad_token_id
    eos = eos_ids(hf, tokenizer)
    out: list[list[int]] = []
    lean = lean_loop and supports_lean_loop(hf)
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            b = collate_prompts(chunk, pad)
            if lean:  # finished rows leave the batch (kdistill.decode)
                ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
                if num_samples > 1:
                    ids, mask = ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
                out += [cut_at_eos(c, eos) for c in decode(hf, ids, mask, max_new_tokens, eos, temperature, min_new_tokens)]
                continue
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                          num_return_sequences=num_samples)
            if min_new_tokens:
                kwargs["min_new_tokens"] = min_new_tokens
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            gen = hf.generate(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), **kwargs)
            clock.add_flops(2 * linear_params(hf) * int(gen.numel()))  # an upper bound: generate runs finished rows on
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
        return VllmSampler(model, ctx.tokenizer, Path(ctx.output_dir) / "vllm_student", ctx.cfg.vllm, key,
                           seed=ctx.cfg.train.seed, max_model_len=ctx.cfg.data.max_length,
                           mixed_precision=ctx.cfg.train.mixed_precision)
    return HFSampler(ctx.tokenizer, batch_size)


def sample_texts(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    device=None,
    finish_reasons: Optional[list] = None,
) -> list[str]:
    """Batched generation (greedy unless ``do_sample``); the decoded new text of each prompt.

    ``finish_reasons``: a list to append each row's ``"stop"`` (ended with EOS) or ``"length"`` to.
    """
    comps = sample_completions(model, tokenizer, prompts, max_new_tokens, temperature if do_sample else 0.0,
                               batch_size, device=device, min_new_tokens=min_new_tokens)
    if finish_reasons is not None:
        eos = set(eos_ids(hf_model(model), tokenizer))
        finish_reasons += ["stop" if c and c[-1] in eos else "length" for c in comps]
    return [tokenizer.decode(c, skip_special_tokens=True).strip() for c in comps]
