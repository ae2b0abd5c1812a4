"""Filters for teacher-written rows, applied before sequence-level training.

Configured by the ``filters:`` section (:class:`FiltersConfig`). Rows go through
the filters in this order and each dropped row is counted once, under the first filter it fails:

==============  ==============================================================================
``empty``       the response is empty or whitespace
``truncated``   ``finish_reason`` is ``length`` (the teacher was cut off by max tokens)
``length``      fewer than ``min_chars`` or more than ``max_chars`` characters
``refusal``     a refusal pattern (case-insensitive regex) in the first 300 characters
``format``      ``format_regex`` does not match, ``format_json`` and not valid JSON, or a
                ``style: rationale`` row without a parsable final answer
``reference``   the answer (``answer`` field, else the response) disagrees with the row's
                ``reference`` (``contains``/``exact``, as in evaluation); rows without one pass
``duplicate``   the same (conversation, response) as an earlier row
``judge``       the LLM judge's score is below ``judge.threshold`` (or unparsable: ``judge_error``)
==============  ==============================================================================

The judge runs last, so only rows that passed everything else are paid for; its scores are
cached in ``OUTPUT_DIR/judge_scores.jsonl`` (keyed by row id and response) so a rerun never asks
again. :func:`apply_filters` returns the kept rows and a report
``{"total", "kept", "dropped": {filter: count}}`` that goes into the run's report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import Field, field_validator

from kdistill.data import Example
from kdistill.evaluate import matches
from kdistill.scoring import parse_score
from kdistill.section import Section
from kdistill.store import JsonlStore

log = logging.getLogger("kdistill")

class JudgeConfig(Section):
    """LLM-as-judge filter: the teacher rates each (prompt, response); rows below threshold are dropped."""

    threshold: float = Field(7.0, description="keep rows scored at or above this (scale 1-10)")
    prompt: Optional[str] = Field(None, description="judge prompt with {prompt} and {response}; must ask for 'Score: N'")
    max_new_tokens: int = Field(32, ge=1)


class FiltersConfig(Section):
    """Filters applied to teacher-written rows before sequence-level training (each counted in the report)."""

    enabled: bool = True
    empty: bool = Field(True, description="drop empty responses")
    truncated: bool = Field(True, description="drop responses cut off by max tokens (finish_reason: length)")
    duplicate: bool = Field(True, description="drop repeated (prompt, response) pairs")
    min_chars: Optional[int] = Field(None, ge=0)
    max_chars: Optional[int] = Field(None, ge=1)
    refusal: bool = Field(True, description="drop responses matching refusal_patterns")
    refusal_patterns: Optional[list[str]] = Field(None, description="regexes (case-insensitive); none = built-in list")
    format_regex: Optional[str] = Field(None, description="keep only responses matching this regex (re.search)")
    format_json: bool = Field(False, description="keep only responses that parse as JSON")
    reference: Optional[Literal["contains", "exact"]] = Field(
        None, description="drop rows whose answer disagrees with the row's 'reference' (rows without one are kept)"
    )
    judge: Optional[JudgeConfig] = None

    @field_validator("format_regex")
    @classmethod
    def _check_regex(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regex ({exc})") from None
        return v


DEFAULT_REFUSAL_PATTERNS = [
    r"\bas an ai(?: language)? model\b",
    r"\bi(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bi can(?:not|'t|no) (?:help|assist|provide|comply|answer)",
    r"\bi apologi[sz]e\b",
    r"\bi (?:won't|will not) (?:be able to )?(?:help|assist|provide|answer)",
]

DEFAULT_JUDGE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question below. Consider helpfulness, relevance, accuracy and level of detail. Rate the response on a "
    "scale of 1 to 10 and reply with \"Score: N\" on the first line, then a short justification.\n\n"
    "[Question]\n{prompt}\n\n[Response]\n{response}"
)

ORDER = ("empty", "truncated", "length", "refusal", "format", "reference", "duplicate", "judge", "judge_error")


def judge_prompt(template: Optional[str], ex: Example) -> str:
    conv = "\n".join(f"{m['role']}: {m['content']}" for m in ex.messages if m["role"] != "system")
    prompt = ex.prompt if len(ex.messages) <= 2 else conv
    return (template or DEFAULT_JUDGE_PROMPT).replace("{prompt}", prompt).replace("{response}", ex.response or "")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _is_json(text: str) -> bool:
    t = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", t, re.S)
    if fence:
        t = fence.group(1)
    try:
        json.loads(t)
        return True
    except ValueError:
        return False


def _first_failure(ex: Example, fc, refusals: list[re.Pattern], fmt: Optional[re.Pattern]) -> Optional[str]:
    text = ex.response or ""
    if fc.empty and not text.strip():
        return "empty"
    if fc.truncated and ex.extra.get("finish_reason") == "length":
        return "truncated"
    n = len(text.strip())
    if (fc.min_chars is not None and n < fc.min_chars) or (fc.max_chars is not None and n > fc.max_chars):
        return "length"
    if fc.refusal and any(p.search(text[:300]) for p in refusals):
        return "refusal"
    style = (ex.extra.get("sampling") or {}).get("style") if isinstance(ex.extra.get("sampling"), dict) else None
    if fmt is not None and not fmt.search(text):
        return "format"
    if fc.format_json and not _is_json(text):
        return "format"
    if style == "rationale" and not ex.extra.get("answer"):
        return "format"
    if fc.reference and ex.reference is not None:
        answer = ex.extra.get("answer") if isinstance(ex.extra.get("answer"), str) else text
        if not matches(answer, ex.reference, fc.reference):
            return "reference"
    return None


class JudgeCache:
    """Judge scores by (row id, response hash), appended to a JSONL file as they arrive
    (:class:`kdistill.store.JsonlStore`: a rerun asks the judge only about rows it has not scored)."""

    def __init__(self, path: Optional[Path]):
        self.store = JsonlStore(path, key="key", shared=False) if path is not None else None
        self.scores: dict[str, Optional[float]] = {k: r.get("score") for k, r in (self.store.rows if self.store else {}).items()}

    @staticmethod
    def key(ex: Example) -> str:
        return ex.id + ":" + hashlib.sha1((ex.response or "").encode()).hexdigest()[:12]

    def add(self, key: str, score: Optional[float], raw: Optional[str]) -> None:
        self.scores[key] = score
        if self.store is not None:
            self.store.append([{"key": key, "score": score, "judge": (raw or "")[:200]}])


JudgeFn = Callable[[list[str]], list[Optional[str]]]  # judge prompts -> the judge's raw answers (None = failed)


def apply_filters(rows: list[Example], fc, judge: Optional[JudgeFn] = None, cache_path: Optional[Path] = None,
                  say: Callable[[str], None] = log.info) -> tuple[list[Example], dict]:
    """Filter teacher-written rows. ``fc``: the ``filters`` config section.

    ``judge`` turns judge prompts into the judge's answers (required when ``fc.judge`` is set).
    Returns ``(kept_rows, report)``; the report counts every enabled filter (0 included).
    """
    total = len(rows)
    if not fc.enabled:
        return list(rows), {"total": total, "kept": total, "dropped": {}, "enabled": False}
    refusals = [re.compile(p, re.I) for p in (fc.refusal_patterns if fc.refusal_patterns is not None
                                              else DEFAULT_REFUSAL_PATTERNS)]
    fmt = re.compile(fc.format_regex) if fc.format_regex else None
    enabled = [name for name, on in (
        ("empty", fc.empty), ("truncated", fc.truncated), ("length", fc.min_chars is not None or fc.max_chars is not None),
        ("refusal", fc.refusal), ("format", True), ("reference", fc.reference is not None),
        ("duplicate", fc.duplicate), ("judge", fc.judge is not None), ("judge_error", fc.judge is not None)) if on]
    dropped = {name: 0 for name in enabled}
    kept: list[Example] = []
    seen: set[str] = set()
    for ex in rows:
        why = _first_failure(ex, fc, refusals, fmt)
        if why is None and fc.duplicate:
            key = hashlib.sha1(json.dumps([[m["role"], _norm(m["content"])] for m in ex.messages]
                                          + [_norm(ex.response or "")]).encode()).hexdigest()
            if key in seen:
                why = "duplicate"
            seen.add(key)
        if why is None:
            kept.append(ex)
        else:
            dropped[why] = dropped.get(why, 0) + 1
    if fc.judge is not None and kept:
        if judge is None:
            raise ValueError("filters.judge needs a judge (a teacher that writes text)")
        cache = JudgeCache(cache_path)
        todo = [ex for ex in kept if JudgeCache.key(ex) not in cache.scores]
        if todo:
            say(f"filters: the judge rates {len(todo)} rows ({len(kept) - len(todo)} scores cached)")
            answers = judge([judge_prompt(fc.judge.prompt, ex) for ex in todo])
            for ex, raw in zip(todo, answers):
                cache.add(JudgeCache.key(ex), parse_score(raw), raw)
        survivors = []
        for ex in kept:
            score = cache.scores.get(JudgeCache.key(ex))
            if score is None:
                dropped["judge_error"] += 1
            elif score < fc.judge.threshold:
                dropped["judge"] += 1
            else:
                survivors.append(ex)
        kept = survivors
    report = {"total": total, "kept": len(kept), "dropped": {k: dropped[k] for k in ORDER if k in dropped}}
    return kept, report
