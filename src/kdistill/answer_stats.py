"""What the answers look like, beside whether they count as correct.

An accuracy alone hides *how* a model answers: under lenient scoring an answer that repeats the
whole question scores as well as a clean extraction. :func:`answer_profile` gives, for one model's
held-out answers, the answer-length distribution (in words) and the **echo share**: the share of
answers that repeat the prompt (five or more consecutive words of the question, after
normalisation, or the whole question when it is shorter).
"""

from __future__ import annotations

from typing import Optional

from kdistill.data import Example
from kdistill.evaluate import normalize_answer

ECHO_WORDS = 5


def echoes(answer: str, prompt: str, n: int = ECHO_WORDS) -> bool:
    """Whether ``answer`` repeats ``n`` consecutive words of ``prompt`` (or all of a shorter prompt)."""
    a, p = normalize_answer(answer).split(), normalize_answer(prompt).split()
    if not a or not p:
        return False
    n = min(n, len(p))
    if len(a) < n:
        return False
    grams = {tuple(p[i : i + n]) for i in range(len(p) - n + 1)}
    return any(tuple(a[i : i + n]) in grams for i in range(len(a) - n + 1))


def _quantile(sorted_values: list[int], q: float) -> float:
    """Linear interpolation between the nearest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def answer_profile(rows: list[Example], outputs: list[str]) -> Optional[dict]:
    """``{"answers", "words": {"mean", "p10", "median", "p90", "max"}, "echo_share"}`` for ``outputs``
    (one per row of ``rows``, in order); None when there are no answers."""
    pairs = [(e, o) for e, o in zip(rows, outputs) if o is not None]
    if not pairs:
        return None
    lengths = sorted(len(normalize_answer(o).split()) for _, o in pairs)
    echo = sum(echoes(o, e.prompt) for e, o in pairs)
    return {
        "answers": len(pairs),
        "words": {"mean": round(sum(lengths) / len(lengths), 2), "p10": round(_quantile(lengths, 0.1), 1),
                  "median": round(_quantile(lengths, 0.5), 1), "p90": round(_quantile(lengths, 0.9), 1),
                  "max": lengths[-1]},
        "echo_share": round(echo / len(pairs), 4),
    }


def profiles(eval_rows: list[Example], evs: dict) -> dict:
    """``{who: answer_profile}`` for each evaluation ``{who: {"outputs": [...]}}`` (outputs follow
    the rows that have a reference, as :func:`kdistill.evaluate.heldout_figures` gives them)."""
    with_ref = [e for e in eval_rows if e.reference is not None]
    out = {}
    for who, ev in evs.items():
        p = answer_profile(with_ref, (ev or {}).get("outputs") or [])
        if p is not None:
            out[who] = p
    return out
