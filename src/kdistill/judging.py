"""A judge's verdicts: teacher vs student compared blind, and answers checked against a reference.

A *pair judge* is a callable ``prefer(judge_prompts) -> [1 | 2 | None]`` (which of the two answers
shown is better; None: no verdict). Two are built here on the judge machinery of
:mod:`kdistill.scoring`: a local model (:func:`local_pair_judge`: the rating-token probabilities of
"1" and "2", nothing generated) and an API model (:func:`api_pair_judge`: its written number).

:func:`blind_compare` shows the judge each held-out prompt twice — teacher's answer first, then the
student's first — and counts a win or a loss only when both orders agree; a disagreement is a tie
(the judge's position bias, cancelled). Identical answers are a tie without asking. The win rate
counts ties half, so 0.5 means the judge cannot tell the student from the teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from kdistill.data import Example, Renderer
from kdistill.evaluate import normalize_answer
from kdistill.scoring import judge_scores
from kdistill.store import JsonlStore

COMPARE_TEMPLATE = (
    "Question: {prompt}\n\nAnswer 1: {first}\n\nAnswer 2: {second}\n\n"
    "Which answer is better: more correct, more helpful, and doing what the question asks? Reply with 1 or 2."
)
CORRECT_TEMPLATE = (
    "Question: {prompt}\n\nReference answer: {reference}\n\nGiven answer: {answer}\n\n"
    "Does the given answer give the reference answer, and nothing wrong? Reply 1 for no or 2 for yes."
)

Prefer = Callable[[list[str]], list[Optional[int]]]


def local_pair_judge(model, tokenizer, max_length: int = 2048, chat_template: bool = True, batch_size: int = 8,
                     device=None) -> Prefer:
    """A local model as judge: 2 when its probability of "2" exceeds that of "1" (renormalised over the
    two), 1 when lower, None on an exact tie. The prompt is a user turn without a system prompt."""
    renderer = Renderer(tokenizer, max_length, None, chat_template)

    def prefer(prompts: list[str]) -> list[Optional[int]]:
        if not prompts:
            return []
        scores = judge_scores(model, tokenizer, renderer, prompts, [""] * len(prompts), "{prompt}", scale=2,
                              batch_size=batch_size, device=device)
        return [2 if s > 1.5 else 1 if s < 1.5 else None for s in scores]

    return prefer


def api_pair_judge(text_teacher) -> Prefer:
    """An API model as judge (``rate`` of :class:`kdistill.teachers.text.ApiTextTeacher`): its number 1 or 2."""

    def prefer(prompts: list[str]) -> list[Optional[int]]:
        return [None if v is None else int(v) for v in text_teacher.rate(prompts, scale=2)] if prompts else []

    return prefer


def _key(*parts: str) -> str:
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


def _ask(prefer: Prefer, prompts: list[str], store: Optional[JsonlStore]) -> list[Optional[int]]:
    """Verdicts for ``prompts``, kept in ``store`` (a rerun asks only for what is missing; failures are
    asked again)."""
    if store is None:
        return prefer(prompts)
    keys = [_key(p) for p in prompts]
    todo = [(k, p) for k, p in dict(zip(keys, prompts)).items() if store.get(k, {}).get("verdict") is None]
    if todo:
        got = prefer([p for _, p in todo])
        store.append([{"key": k, "verdict": v} for (k, _), v in zip(todo, got)])
    return [store.get(k, {}).get("verdict") for k in keys]


def blind_compare(rows: list[Example], teacher_answers: list[str], student_answers: list[str], prefer: Prefer,
                  template: Optional[str] = None, keep: Optional[Path] = None, show: int = 3) -> dict:
    """The student against the teacher on ``rows`` (no references shown), each pair asked in both orders.

    Returns ``{"prompts", "wins", "ties", "losses", "win_rate", "position_consistency", "unjudged",
    "samples"}`` from the student's side: ``win_rate = (wins + ties / 2) / prompts``;
    ``position_consistency`` is the share of judged pairs whose two verdicts agreed. ``keep``: a
    JSONL file of verdicts (reruns reuse them).
    """
    template = template or COMPARE_TEMPLATE
    store = JsonlStore(keep, key="key", shared=False) if keep is not None else None
    same = [normalize_answer(t) == normalize_answer(s) for t, s in zip(teacher_answers, student_answers)]
    ask = [i for i, d in enumerate(same) if not d]
    first = [template.format(prompt=rows[i].prompt, first=teacher_answers[i], second=student_answers[i]) for i in ask]
    swapped = [template.format(prompt=rows[i].prompt, first=student_answers[i], second=teacher_answers[i]) for i in ask]
    verdicts = _ask(prefer, first + swapped, store)
    va, vb = verdicts[: len(ask)], verdicts[len(ask):]
    wins = losses = unjudged = agreed = 0
    outcome = {i: "tie" for i, d in enumerate(same) if d}
    for i, a, b in zip(ask, va, vb):
        if a is None or b is None:
            unjudged += 1
            outcome[i] = "tie"
            continue
        student_a, student_b = a == 2, b == 1  # the student is "2" in the first order, "1" in the swapped one
        if student_a == student_b:
            agreed += 1
            outcome[i] = "win" if student_a else "loss"
            wins += student_a
            losses += not student_a
        else:
            outcome[i] = "tie"
    n = len(rows)
    ties = n - wins - losses
    judged = len(ask) - unjudged
    return {
        "prompts": n, "wins": wins, "ties": ties, "losses": losses,
        "win_rate": round((wins + 0.5 * ties) / n, 4) if n else None,
        "identical_answers": sum(same), "unjudged": unjudged,
        "position_consistency": round(agreed / judged, 4) if judged else None,
        "samples": [{"prompt": rows[i].prompt, "teacher": teacher_answers[i], "student": student_answers[i],
                     "verdict": outcome[i]} for i in range(min(show, n))],
    }


MIN_POSITION_CONSISTENCY = 0.5  # below it, a blind judge's verdicts are no evidence


def judge_evidence(result: dict) -> dict:
    """``result`` of :func:`blind_compare`, marked ``unreliable`` (with why) when fewer than half of
    the pairs it judged got the same verdict in both orders: the verdict then follows the answers'
    position, not their content, and its win rate (0.5 from ties) must not read as parity."""
    out = dict(result)
    pc = out.get("position_consistency")
    if pc is not None and pc < MIN_POSITION_CONSISTENCY:
        out["unreliable"] = (f"the judge gave the same verdict in both orders on only {pc:.0%} of the pairs it judged: "
                             "its verdict follows the answers' position, not their content, so it is no evidence "
                             "either way (no judge retention; try a stronger judge: eval.judge.api)")
    return out


def correctness_judge(prefer: Prefer, template: Optional[str] = None,
                      keep: Optional[Path] = None) -> Callable[[list[Example], list[str]], list[bool]]:
    """``eval.match: judge``: ``(rows, answers) -> [correct?]``, the judge shown the question, the
    reference and the answer (2 = correct; no verdict = not correct)."""
    template = template or CORRECT_TEMPLATE
    store = JsonlStore(keep, key="key", shared=False) if keep is not None else None

    def judge(rows: list[Example], answers: list[str]) -> list[bool]:
        prompts = [template.format(prompt=e.prompt, reference=e.reference, answer=a) for e, a in zip(rows, answers)]
        return [v == 2 for v in _ask(prefer, prompts, store)]

    return judge
