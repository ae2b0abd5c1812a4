"""The training and held-out rows of a run, from its ``data:`` section.

Held-out rows are ``data.eval``, or a deterministic split of the training rows (by id hash, stable
when rows are added or reordered). With ``data.tasks``: every task's rows (ids ``task/ID``,
``extra["task"]``), held out per task, the training rows mixed by the tasks' weights. With
``data.holdout_by``, whole groups are held out (:mod:`kdistill.holdout`). Held-out rows that are also
training rows are flagged: their figures measure memory, not generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from kdistill.data import Example, load_examples, mix_tasks, split_examples, tag_task, task_of
from kdistill.errors import ConfigError
from kdistill.holdout import split_by_group


@dataclass
class Rows:
    train: list[Example]
    held: list[Example]
    mixture: dict = field(default_factory=dict)  # per task: rows available and used (data.tasks)


def read_rows(cfg, require_train: bool = True, require_response: bool = True, train_path: Optional[str] = None,
              say: Callable[[str], None] = print) -> Rows:
    """``data:`` -> :class:`Rows`. ``train_path`` replaces ``data.train`` (e.g. answers just written);
    ``require_response=False`` accepts prompt-only rows (methods that write their own answers)."""
    if cfg.data.tasks is not None:
        train, held = [], []
        for t in cfg.data.tasks:
            rows = tag_task(load_examples(t.train, require_response=require_response), t.name)
            if t.eval is not None:
                h = tag_task(load_examples(t.eval, require_response=require_response), t.name)
            else:
                rows, h = _split(cfg, rows, t.train)
            train += rows
            held += h[: cfg.data.max_eval_rows]
        stats = {t.name: {"rows": sum(task_of(e) == t.name for e in train)} for t in cfg.data.tasks}
        if all(t.weight is not None for t in cfg.data.tasks):
            train, stats = mix_tasks(train, {t.name: t.weight for t in cfg.data.tasks}, cfg.train.seed)
        return Rows(train, _flag_overlap(train, held, say), stats)
    train: list[Example] = []
    train_path = train_path or cfg.data.train
    if train_path is not None:
        train = load_examples(train_path, require_response=require_response)
    elif require_train:
        raise ConfigError("data.train: required key is missing (a JSONL file of prompt/response rows, e.g. "
                          "teacher-written rows from `kdistill generate`, or a generate: section)")
    if cfg.data.eval is not None:
        if cfg.data.holdout_by is not None:
            raise ConfigError("data.holdout_by: splits held-out rows from data.train, but data.eval is set")
        held = load_examples(cfg.data.eval, require_response=require_response)
    elif train:
        train, held = _split(cfg, train, train_path)
    elif cfg.eval.benchmarks is not None and not require_train:
        return Rows([], [])  # kdistill eval on standard benchmarks alone
    else:
        raise ConfigError("data.eval: required key is missing (or give data.train to hold out a split)")
    return Rows(train, _flag_overlap(train, held[: cfg.data.max_eval_rows], say))


def _split(cfg, rows: list[Example], source: str) -> tuple[list[Example], list[Example]]:
    """Held-out rows split from training rows: whole groups with ``data.holdout_by``, else rows."""
    d = cfg.data
    if d.holdout_by is not None:
        return split_by_group(rows, d.holdout_by, d.eval_fraction, cfg.train.seed, source)
    return split_examples(rows, d.eval_fraction, cfg.train.seed)


def _flag_overlap(train: list[Example], held: list[Example], say: Callable[[str], None]) -> list[Example]:
    seen = {tuple(map(str, e.conversation())) for e in train}
    same = sum(tuple(map(str, e.conversation())) in seen for e in held)
    if same:
        say(f"warning: {same} of {len(held)} held-out rows are training rows (same conversation): their figures "
            "measure memory, not generalisation; give data.eval rows the student does not train on")
    return held
