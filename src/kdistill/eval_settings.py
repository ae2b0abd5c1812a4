"""Config sections of the trust checks: standard benchmarks (``eval.benchmarks``), the judge
(``eval.judge``, completed with its ``api`` in :mod:`kdistill.settings`) and ``report:``.

Kept apart from :mod:`kdistill.settings` (which composes them into the run-level sections) so that
module stays one screenful per section; the defaults here are the single source, as there.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from pydantic import Field, field_validator, model_validator

from kdistill.section import Section as _Section


class BenchmarkTask(_Section):
    """One lm-evaluation-harness task (or group) with an optional capability group."""

    name: str = Field(..., min_length=1, description="an lm-eval task or group name (hub task, or one in include_path)")
    group: Optional[str] = Field(None, description="capability group in the report (e.g. reasoning); none = its own")


class BenchmarksConfig(_Section):
    """Standard benchmarks through lm-evaluation-harness (``pip install 'kdistill[benchmarks]'``), run on
    the teacher, the initial student and the trained student with lm-eval's own metrics. Results are
    kept per (model fingerprint, task, settings) under ``OUTPUT/benchmarks/``: a rerun skips finished
    tasks. Tasks may be hub tasks (``arc_easy``, ``gsm8k``...) or local task YAMLs (``include_path``)."""

    tasks: list[Union[str, BenchmarkTask]] = Field(..., description="task names, or {name, group}")
    include_path: Optional[str] = Field(None, description="folder of local lm-eval task YAMLs (e.g. over local JSONL)")
    num_fewshot: Optional[int] = Field(None, ge=0, description="few-shot examples; none = each task's default")
    limit: Optional[float] = Field(None, gt=0, description="examples per task (a number, or a share below 1); none = all")
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = Field(False, description="render prompts with the model's chat template")
    max_length: Optional[int] = Field(None, ge=16, description="context length lm-eval may use; none = the model's")
    seed: int = Field(1234, description="lm-eval's sampling / few-shot seeds")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list) -> list:
        if not v:
            raise ValueError("give at least one task")
        names = [t if isinstance(t, str) else t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique (repeated: {', '.join(dup)})")
        return v

    def task_list(self) -> list[BenchmarkTask]:
        return [BenchmarkTask(name=t) if isinstance(t, str) else t for t in self.tasks]


class JudgeSettings(_Section):
    """The judge: the teacher (or ``api``, an API model) compares answers or checks one."""

    prompts: int = Field(0, ge=0, description="held-out prompts for the blind teacher-vs-student comparison (0 = off)")
    compare_template: Optional[str] = Field(
        None, description="pairwise prompt with {prompt}, {first}, {second}; must ask for 1 or 2 (none = built-in)")
    correct_template: Optional[str] = Field(
        None, description="eval.match: judge prompt with {prompt}, {reference}, {answer}; must ask for 1 (wrong) "
        "or 2 (correct) (none = built-in)")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="answer length for the comparison; none = eval's")

    @model_validator(mode="after")
    def _templates(self) -> "JudgeSettings":
        for key, need in (("compare_template", ("{prompt}", "{first}", "{second}")),
                          ("correct_template", ("{prompt}", "{reference}", "{answer}"))):
            v = getattr(self, key)
            missing = [n for n in need if v is not None and n not in v]
            if missing:
                raise ValueError(f"eval.judge.{key}: must contain {', '.join(missing)}")
        return self


class ReportConfig(_Section):
    """What the report adds beyond the measured figures."""

    cost_per_hour: Optional[float] = Field(
        None, gt=0, description="price of the hardware per hour (any currency): gives cost per million generated tokens")
    retention_floor: float = Field(
        0.8, gt=0, description="capability table: tasks and groups whose retention is below this are flagged")


def check_answer_regex(match: str, answer_regex: Optional[str]) -> None:
    """``eval.match: regex`` needs a valid ``eval.answer_regex``."""
    if match != "regex":
        return
    if not answer_regex:
        raise ValueError("eval.answer_regex: required with eval.match: regex (its first group is the answer)")
    try:
        re.compile(answer_regex)
    except re.error as exc:
        raise ValueError(f"eval.answer_regex: not a valid regex ({exc})") from None
