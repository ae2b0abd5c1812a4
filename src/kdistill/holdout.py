"""Is the held-out set really held out? Whole-group splits, and a contamination check.

* :func:`split_by_group` (``data.holdout_by: FIELD``) holds out whole groups of rows — every row
  of a sentence template, a task, a source — so the held-out score measures generalisation to
  unseen groups, not to unseen rows of seen groups.
* :func:`contamination` checks every held-out prompt against the training prompts: exact
  duplicates after normalisation (case, punctuation, whitespace) and near duplicates (Jaccard
  similarity of word 3-gram sets at or above a threshold). The report says how many overlap.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from typing import Optional

from kdistill.data import Example
from kdistill.errors import DataError
from kdistill.evaluate import normalize_answer


def group_of(example: Example, field: str) -> Optional[str]:
    """The value of ``field`` in a row (its extra fields, or ``id``/``reference``), as text."""
    v = example.extra.get(field, getattr(example, field, None) if field in ("id", "reference") else None)
    return None if v is None else str(v)


def split_by_group(examples: list[Example], field: str, fraction: float, seed: int,
                   source: str = "data.train") -> tuple[list[Example], list[Example]]:
    """``(train, held)``: whole groups (rows sharing ``field``'s value) held out until they hold at
    least ``fraction`` of the rows; the groups are chosen by a seeded hash of their value, so the
    split is stable when rows are added. At least one group is held out and one kept."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        g = group_of(e, field)
        if g is None:
            raise DataError(f"{source}: row {e.id!r} has no {field!r} field (data.holdout_by: {field})")
        groups[g].append(e)
    if len(groups) < 2:
        raise DataError(f"{source}: data.holdout_by: {field}: only {len(groups)} group(s); need two or more to hold "
                        "one out")
    order = sorted(groups, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    want = max(1, math.ceil(fraction * len(examples)))
    held: set[str] = set()
    n = 0
    for g in order[:-1]:
        if n >= want:
            break
        held.add(g)
        n += len(groups[g])
    return ([e for e in examples if group_of(e, field) not in held],
            [e for e in examples if group_of(e, field) in held])


def _shingles(text: str, n: int = 3) -> frozenset:
    words = normalize_answer(text).split()
    if len(words) <= n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def contamination(train: list[Example], held: list[Example], threshold: float = 0.8, show: int = 5) -> dict:
    """How many held-out prompts (each row's last user turn) also appear among the training prompts.

    ``exact``: equal after normalisation; ``near_duplicate``: not exact, but the Jaccard similarity
    of their word 3-gram sets is at least ``threshold``. Candidates come from an inverted index of
    each prompt's rarest shingles (a pair at ``threshold`` must share one of them), so this stays
    fast on large training sets. Returns counts, the threshold and up to ``show`` examples.
    """
    norm_train: dict[str, str] = {}
    sh_train: list[frozenset] = []
    index: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(train):
        norm_train.setdefault(normalize_answer(e.prompt), e.id)
        s = _shingles(e.prompt)
        sh_train.append(s)
        for x in s:
            index[x].append(i)
    df = Counter({k: len(v) for k, v in index.items()})
    exact = near = 0
    examples: list[dict] = []
    for e in held:
        hit = norm_train.get(normalize_answer(e.prompt))
        if hit is not None:
            exact += 1
            if len(examples) < show:
                examples.append({"id": e.id, "train_id": hit, "kind": "exact", "similarity": 1.0})
            continue
        s = _shingles(e.prompt)
        if not s:
            continue
        k = len(s) - math.ceil(threshold * len(s)) + 1  # prefix filter: a match shares one of these
        rare = sorted(s, key=lambda x: (df.get(x, 0), x))[:k]
        cands = {i for x in rare for i in index.get(x, ())}
        best, best_i = 0.0, None
        for i in cands:
            inter = len(s & sh_train[i])
            sim = inter / (len(s) + len(sh_train[i]) - inter)
            if sim > best:
                best, best_i = sim, i
        if best_i is not None and best >= threshold:
            near += 1
            if len(examples) < show:
                examples.append({"id": e.id, "train_id": train[best_i].id, "kind": "near_duplicate",
                                 "similarity": round(best, 3)})
    return {"held_out": len(held), "exact": exact, "near_duplicate": near, "threshold": threshold,
            "examples": examples}
