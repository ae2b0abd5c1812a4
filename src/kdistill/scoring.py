"""Scorers: how a model (teacher, judge, or the student itself) scores an answer.

One vocabulary for every method that scores (``scorer:`` keys, filters, the win rate):

* ``loglik`` — :func:`loglik_scores`: the model's mean log-likelihood per answer token;
* ``judge`` with a local model — :func:`judge_scores`: a rating prompt, scored from the model's
  next-token probabilities of the rating tokens "1".."scale" (the expected rating, in [1, scale]);
  no text is generated, so the score is deterministic and never fails to parse;
* ``judge`` over an API — the judge writes its rating; :func:`parse_score` reads the number.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX, Example, collate
from kdistill.models.introspect import hf_model
from kdistill.models.student import model_label_logprobs

DEFAULT_JUDGE_TEMPLATE = (
    "Question: {prompt}\n\nAnswer: {answer}\n\n"
    "How good is this answer to the question? Rate it from 1 (bad) to {scale} (excellent). "
    "Reply with one number."
)


@torch.no_grad()
def loglik_scores(model: nn.Module, features: list[dict], pad_id: int, vocab_size: int, batch_size: int = 8,
                  device=None) -> list[float]:
    """Mean log-likelihood per completion token of each row under ``model`` (float32)."""
    hf = hf_model(model)
    device = device or next(hf.parameters()).device
    scores: list[float] = []
    for i in range(0, len(features), batch_size):
        b = collate(features[i : i + batch_size], pad_id)
        labels = b["labels"].to(device)
        sums = model_label_logprobs(hf, b["input_ids"].to(device), b["attention_mask"].to(device), labels,
                                    vocab_size).sum(-1)
        counts = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
        scores += (sums / counts).tolist()
    return scores


def rating_token_ids(tokenizer, scale: int) -> list[int]:
    ids = []
    for r in range(1, scale + 1):
        enc = tokenizer(str(r), add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"judge: the rating {r!r} is not a single token for this tokenizer; use scorer: loglik")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def judge_scores(model: nn.Module, tokenizer, renderer, prompts: list[str], answers: list[str], template: str,
                 scale: int = 5, batch_size: int = 8, device=None) -> list[float]:
    """The expected rating ``Σ_r r·p(r)`` the judge gives each answer, in [1, ``scale``].

    The judge prompt (``template`` with ``{prompt}``, ``{answer}``, ``{scale}``) is rendered as a user
    turn with the chat template and a generation prompt; ``p(r)`` is the judge's next-token
    probability of the rating token r, renormalized over the ratings 1..scale.
    """
    hf = hf_model(model)
    device = device or next(hf.parameters()).device
    rating = torch.tensor(rating_token_ids(tokenizer, scale), device=device)
    values = torch.arange(1, scale + 1, dtype=torch.float32, device=device)
    rows = []
    for p, a in zip(prompts, answers):
        text = template.format(prompt=p, answer=a, scale=scale)
        rows.append(renderer.prompt_ids(Example(id="", messages=[{"role": "user", "content": text}], response=None)))
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        b = collate([{"input_ids": r, "labels": r} for r in chunk], tokenizer.pad_token_id)  # right padding
        logits = hf(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                    use_cache=False).logits
        last = torch.tensor([len(r) - 1 for r in chunk], device=device)
        lp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float()[:, rating], dim=-1)
        out += (lp.exp() * values).sum(-1).tolist()
    return out


_SCORE_RE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.I)
_NUM_RE = re.compile(r"(\d+(?:\.\d+)?)")


def parse_score(text: Optional[str]) -> Optional[float]:
    """The number after ``Score:`` (else the first number) in a judge's answer; None if there is none."""
    if not text:
        return None
    m = _SCORE_RE.search(text) or _NUM_RE.search(text)
    return float(m.group(1)) if m else None
