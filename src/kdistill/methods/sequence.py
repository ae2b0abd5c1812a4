"""Sequence-level distillation: cross-entropy on the teacher's written responses (Kim & Rush 2016).

The training rows are teacher-written (``kdistill generate``, or a ``generate:`` section in the
run config); the loss is the shared token cross-entropy on the response tokens, averaged over
the global count of response tokens. No teacher logits are needed, so the teacher can be an API,
absent at train time, or use a different tokenizer.

Rows with ``rationale`` and ``answer`` fields (``generate.style: rationale``) are learned as two
tasks, as in *Distilling step-by-step* (Hsieh et al. 2023): each row gives two encoded views, the
prompt prefixed with ``sequence.answer_prefix`` -> the answer, and with
``sequence.rationale_prefix`` -> the rationale. The loss is then a weighted mean over views of each
view's mean token cross-entropy, weight 1 for answers and ``lambda = sequence.rationale_weight``
for rationales; with both views of every row that is ``(L_answer + lambda * L_rationale) / 2`` in
expectation. At inference the student is prompted with the answer prefix (the report does so).

Before the student is built, :meth:`SequenceMethod.training_rows` writes the data: with a
``generate:`` section the teacher (``teacher.api``, else the local ``teacher.model``) answers the
prompts first (:mod:`kdistill.answers`: resumable, append-only); then the ``filters:`` drop bad
teacher rows, each counted in the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from kdistill.answers import generate
from kdistill.data import IGNORE_INDEX, Example, Renderer
from kdistill.errors import DataError
from kdistill.filters import JudgeFn, apply_filters
from kdistill.methods.base import Method, RunContext, register
from kdistill.sampling import sample_texts
from kdistill.settings import Section
from kdistill.teachers.api import ApiTeacher, Job

class SequenceConfig(Section):
    """``method: sequence`` (cross-entropy on teacher-written responses)."""

    rationale_weight: float = Field(
        1.0, ge=0.0, description="lambda in loss = answer + lambda * rationale, for rows with rationale/answer fields"
    )
    answer_prefix: str = Field("[answer] ", description="task prefix of the answer view of a rationale row")
    rationale_prefix: str = Field("[rationale] ", description="task prefix of the rationale view")


def make_judge(cfg, local=None) -> JudgeFn:
    """The ``filters.judge``: the API teacher if set, else the local teacher model ``local=(model, tok)``."""
    jc = cfg.filters.judge
    if cfg.teacher.api is not None:
        api = ApiTeacher(cfg.teacher.api)

        def judge_api(prompts: list[str]) -> list[Optional[str]]:
            jobs = [Job(i, [{"role": "user", "content": p}], 0.0, jc.max_new_tokens) for i, p in enumerate(prompts)]
            return [c.text for c in api.complete_many(jobs)]

        return judge_api
    if local is None:
        raise ValueError("filters.judge needs teacher.api or a local teacher.model")
    model, tok = local

    def judge_local(prompts: list[str]) -> list[Optional[str]]:
        r = Renderer(tok, max_length=10**9, chat_template=cfg.data.chat_template)
        ids = [r.prompt_ids(Example(str(i), [{"role": "user", "content": p}], None)) for i, p in enumerate(prompts)]
        return sample_texts(model, tok, ids, jc.max_new_tokens, cfg.eval.batch_size)

    return judge_local


def has_rationale(ex: Example) -> bool:
    r, a = ex.extra.get("rationale"), ex.extra.get("answer")
    return isinstance(r, str) and isinstance(a, str) and bool(r.strip()) and bool(a.strip())


def with_prefix(ex: Example, prefix: str, response: Optional[str], suffix: str = "") -> Example:
    """A copy of ``ex`` whose last user message starts with ``prefix`` and whose response is ``response``."""
    msgs = [dict(m) for m in ex.messages]
    for m in reversed(msgs):
        if m["role"] == "user":
            m["content"] = prefix + m["content"]
            break
    return replace(ex, id=ex.id + suffix, messages=msgs, response=response, history=[])


@register
class SequenceMethod(Method):
    name = "sequence"
    sections = {"sequence": SequenceConfig}
    shares_vocab = False  # only the teacher's text is used: any tokenizer

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        return frozenset({"text"}) if cfg.generate is not None else frozenset()  # else: teacher-written data

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.generate is not None and cfg.data.tasks is not None:
            raise ValueError("data.tasks: a generate: section writes one file; run `kdistill generate` per task and "
                             "list the answer files in data.tasks")
        if cfg.generate is not None and cfg.teacher.api is None and cfg.teacher.model is None:
            raise ValueError("teacher: a generate: section needs teacher.api or teacher.model to write the answers")

    @classmethod
    def rows_after_teacher(cls, cfg) -> bool:
        return True  # the teacher may write them (generate:) and judge them (filters.judge)

    @classmethod
    def training_rows(cls, run):
        """The teacher's answers (``generate:``), read back as rows, then filtered (``filters:``)."""
        cfg = run.cfg
        gen_summary, train_path = None, cfg.data.train
        if cfg.generate is not None and run.training:
            with run.acc.main_process_first():  # one process pays; the others then find every row answered
                gen_summary = generate(cfg, run.say, run.progress and run.acc.is_main_process,
                                       local=run.t_weights if cfg.teacher.api is None else None)
            train_path = gen_summary["output"]
        train_rows, eval_rows = run.read_rows(require_train=run.training, train_path=train_path)
        run.extras["generation"] = gen_summary
        if not run.training:
            return train_rows, eval_rows
        judge = make_judge(cfg, run.t_weights) if cfg.filters.judge is not None else None
        n0 = len(train_rows)
        with run.acc.main_process_first():  # judge scores are kept: asked once
            train_rows, report = apply_filters(train_rows, cfg.filters, judge, run.out / "judge_scores.jsonl", run.say)
        dropped = {k: v for k, v in report["dropped"].items() if v}
        run.say(f"filters: kept {len(train_rows)} of {n0} teacher-written rows"
                + (f" (dropped {', '.join(f'{k} {v}' for k, v in dropped.items())})" if dropped else ""))
        if not train_rows:
            raise DataError(f"filters: no training row is left (dropped: {report['dropped']})")
        run.extras["filters"] = report
        return train_rows, eval_rows

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.extras = dict(ctx.extra)
        sc = ctx.cfg.sequence
        self.lam = sc.rationale_weight
        self.prefixes = {"answer": sc.answer_prefix, "rationale": sc.rationale_prefix}
        self.task_of: dict[str, str] = {}
        self.counts: Counter = Counter()
        self.multitask = any(has_rationale(e) for e in ctx.train_examples)
        self.packs = not self.multitask  # per-row means (multi-task views) need one row per sequence

    def views(self, ex: Example) -> list[tuple[str, Example]]:
        if not self.multitask:
            return [("response", ex)]
        if not has_rationale(ex):  # a row without a parsable rationale: answer task only
            return [("answer", with_prefix(ex, self.prefixes["answer"], ex.extra.get("answer") or ex.response, "::answer"))]
        out = [("answer", with_prefix(ex, self.prefixes["answer"], ex.extra["answer"], "::answer"))]
        if self.lam > 0:
            out.append(("rationale", with_prefix(ex, self.prefixes["rationale"], ex.extra["rationale"], "::rationale")))
        return out

    def train_features(self) -> list[dict]:
        feats: list[dict] = []
        renderer = self.ctx.renderer
        for ex in self.ctx.train_examples:
            for task, view in self.views(ex):
                f = renderer.encode(view)
                if all(l == IGNORE_INDEX for l in f["labels"]):
                    self.counts["empty_" + task] += 1
                    continue
                self.task_of[f["id"]] = task
                self.counts[task] += 1
                feats.append(f)
        if not feats:
            raise DataError("method sequence: no training row has response tokens within data.max_length")
        return feats

    def eval_rows(self, rows: list) -> list:
        if not self.multitask:
            return rows
        return [with_prefix(e, self.prefixes["answer"], e.response) for e in rows]

    def describe(self) -> str:
        return "sequence-level KD, cross-entropy on teacher text"

    def num_items(self, batch: dict) -> int:
        if self.multitask:
            return len(batch["ids"])  # views (each is a per-view mean)
        return super().num_items(batch)

    def loss(self, model, batch, num_items):
        if not self.multitask:
            return super().loss(model, batch, num_items)
        logits = model(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        n = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
        per_view = tok.sum(-1) / n  # [batch]
        tasks = [self.task_of.get(i, "answer") for i in batch["ids"]]
        w = torch.tensor([self.lam if t == "rationale" else 1.0 for t in tasks], device=per_view.device)
        info = {}
        for name in ("answer", "rationale"):
            sel = [j for j, t in enumerate(tasks) if t == name]
            if sel:
                info[f"ce_{name}"] = float(per_view[sel].mean().detach())
        return (w * per_view).sum() / num_items, info

    def summary(self) -> dict:
        out = {"loss": "cross-entropy on teacher-written responses (sequence-level KD)",
               "views": dict(self.counts)}
        if self.multitask:
            out["tasks"] = {"answer_prefix": self.prefixes["answer"], "rationale_prefix": self.prefixes["rationale"],
                            "rationale_weight": self.lam}
        if self.extras.get("filters") is not None:
            out["filters"] = self.extras["filters"]
        if self.extras.get("generation") is not None:
            out["generation"] = {k: v for k, v in self.extras["generation"].items() if k != "teacher"}
        return out

    def report_extras(self) -> dict:
        return {k: self.extras[k] for k in ("filters", "generation") if self.extras.get(k) is not None}
