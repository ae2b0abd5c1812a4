"""Curriculum: train on the easiest rows first, then on everything (``curriculum:`` section).

Rows are ranked by a difficulty score (``by``): ``length`` (response tokens) or ``teacher_loss``
(the teacher's mean negative log-likelihood of the response, one teacher pass before training;
saved in ``OUTPUT/curriculum.json`` so a resumed run reuses it). For the first ``steps`` share of the
optimizer steps, every micro-batch is drawn (seeded by its global index, so a resumed or
multi-process run draws the same rows) from the easiest rows only; that pool starts at ``start`` of
the rows and grows to all of them, linearly or as the square root of progress (competence-based
curriculum, Platanios et al. 2019). After that, training goes on with ordinary shuffled epochs.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Optional

from kdistill.data import IGNORE_INDEX
from kdistill.errors import ConfigError
from kdistill.scoring import loglik_scores
from kdistill.store import memo_json, read_json


def difficulty(cc, features: list[dict], out: Path, teacher=None, pad_id: int = 0, vocab_size: int = 0,
               batch_size: int = 8) -> list[float]:
    """One score per feature row (higher = harder), cached in ``out/curriculum.json``."""
    if cc.by == "length":
        return [float(sum(l != IGNORE_INDEX for l in f["labels"])) for f in features]
    ids = [f["id"] for f in features]
    path = Path(out) / "curriculum.json"
    same = lambda v: isinstance(v, dict) and v.get("by") == cc.by and v.get("ids") == ids  # noqa: E731
    if teacher is None and not same(read_json(path)):
        raise ConfigError("curriculum.by: teacher_loss needs a live teacher model (teacher.model) with the "
                          "student's tokenizer; use by: length otherwise")
    scores = lambda: [-s for s in loglik_scores(teacher, features, pad_id, vocab_size, batch_size)]  # noqa: E731
    return memo_json(path, lambda: {"by": cc.by, "ids": ids, "scores": scores()}, valid=same)["scores"]


def schedule(cc, scores: list[float], batch_size: int, seed: int, total_steps: int,
             micro_per_step: int) -> Callable[[int], Optional[list[int]]]:
    """``pick(g)``: the row indices of global micro-batch ``g`` while the curriculum lasts, else None."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    n = len(order)
    end = max(1, math.ceil(cc.steps * total_steps))

    def pick(g: int) -> Optional[list[int]]:
        step = g // micro_per_step
        if step >= end:
            return None
        progress = step / end
        frac = cc.start + (1.0 - cc.start) * (math.sqrt(progress) if cc.pacing == "sqrt" else progress)
        pool = max(min(batch_size, n), math.ceil(frac * n))
        rows = random.Random(f"{seed}:curriculum:{g}").sample(range(pool), min(batch_size, pool))
        return [order[i] for i in rows]

    return pick


def describe(cc, scores: list[float], total_steps: int) -> dict:
    s = sorted(scores)
    return {"by": cc.by, "start": cc.start, "steps": max(1, math.ceil(cc.steps * total_steps)), "pacing": cc.pacing,
            "easiest": round(s[0], 4) if s else None, "median": round(s[len(s) // 2], 4) if s else None,
            "hardest": round(s[-1], 4) if s else None}
