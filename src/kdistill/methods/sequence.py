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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from kdistill.data import IGNORE_INDEX, Example
from kdistill.errors import DataError
from kdistill.methods import register
from kdistill.methods.base import Method, RunContext


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


class SequenceMethod(Method):
    name = "sequence"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        sc = ctx.cfg.sequence
        self.lam = sc.rationale_weight
        self.prefixes = {"answer": sc.answer_prefix, "rationale": sc.rationale_prefix}
        self.task_of: dict[str, str] = {}
        self.counts: Counter = Counter()
        self.multitask = any(has_rationale(e) for e in ctx.train_examples)

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
        return out


@register("sequence")
def _build(ctx: RunContext) -> Method:
    return SequenceMethod(ctx)
