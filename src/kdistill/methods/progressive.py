"""``method: progressive``: shrink the student in stages, distilling at every size.

Each stage lives in ``OUTPUT/progressive/stage-K-<layers>/`` (its own checkpoints, ``metrics.jsonl``,
``student/`` and ``done.json``; a finished stage is skipped on rerun, an interrupted one resumes):

* stage 0 trains the student the run built (``student.init`` or ``student.model``) with the
  ``logit`` method (``loss:``, ``features:`` as configured) against the teacher;
* stage K cuts stage K−1's student to ``progressive.layers[K−1]`` blocks (``layer_selection``;
  ``importance`` scores the blocks of that student on training rows) and distills into it, from the
  original teacher or, with ``teacher: previous``, from stage K−1's student (a teacher assistant).

The student's ``config.kdistill_teacher_layers`` always names the *original* teacher's blocks
(cuts compose), so the model card and feature maps stay right.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from kdistill.data import collate, encode_examples
from kdistill.methods.base import Method, RunContext, register
from kdistill.methods.logit import LogitMethod
from kdistill.models import (count_params, cut_student, hf_model, layer_importance, load_saved, num_layers, save_model,
                             select_layers)
from kdistill.settings import Section
from kdistill.stages import combine_metrics, train_config
from kdistill.store import run_stage
from kdistill.teachers.local import LocalTeacher

class ProgressiveConfig(Section):
    """``method: progressive`` — shrink the student in stages, distilling at each size (logit KD).

    Stage 0 trains the student as configured (e.g. cut from the teacher by ``student.init``); each
    later stage cuts the previous stage's student to the next size in ``layers`` (by
    ``layer_selection``) and distills into it, from the original teacher or (``teacher: previous``)
    from the previous stage's student as a teacher assistant (TAKD, Mirzadeh et al. 2020).
    """

    layers: list[int] = Field(default_factory=list, description="sizes after stage 0, each smaller than the one before")
    teacher: Literal["original", "previous"] = Field("original", description="who teaches the later stages")
    layer_selection: Literal["importance", "uniform", "first", "last", "first_last"] = Field(
        "importance", description="which blocks of the previous stage's student a stage keeps"
    )
    steps_per_stage: Optional[int] = Field(None, ge=1, description="optimizer steps per stage (none = train.max_steps)")

    @field_validator("layers")
    @classmethod
    def _decreasing(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v) or any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError(f"expected positive sizes, each smaller than the one before, got {v}")
        return v


@register
class Progressive(Method):
    name = "progressive"
    sections = {"progressive": ProgressiveConfig}
    single_pass = False
    uses_loss = True
    uses_features = True

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        return frozenset({"weights", "distribution"} | ({"hidden_states"} if cfg.features.weight > 0 else set()))

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.progressive.layers:
            raise ValueError("method progressive: set progressive.layers (the student sizes after stage 0, e.g. [12, 8])")
        if cfg.student is not None and cfg.student.lora is not None:
            raise ValueError("student.lora: method progressive cuts the student's blocks between stages, which a LoRA "
                             "student's frozen weights cannot follow; use LoRA with a single-size method")

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.pc = ctx.cfg.progressive
        if not isinstance(ctx.teacher, LocalTeacher):
            raise ValueError("progressive needs a live teacher model (teacher.model), not a cache, an API or several teachers")
        n0 = num_layers(ctx.student)
        if self.pc.layers and self.pc.layers[0] >= n0:
            raise ValueError(f"progressive.layers: the first size ({self.pc.layers[0]}) must be below the stage-0 "
                             f"student's {n0} layers")
        self.root = Path(ctx.output_dir) / "progressive"
        self.stages: list[dict] = []

    def _cut(self, student, n_keep: int, feats: list[dict]):
        n = num_layers(student)
        scores = None
        if self.pc.layer_selection == "importance":
            pad = self.ctx.tokenizer.pad_token_id
            init = self.ctx.cfg.student.init if self.ctx.cfg.student is not None else None
            sample = feats[: init.importance_samples if init is not None else 32]
            scores = layer_importance(hf_model(student), [collate(sample[i : i + 8], pad) for i in range(0, len(sample), 8)])
        keep = select_layers(n, n_keep, self.pc.layer_selection, scores)
        source = list(getattr(student.config, "kdistill_teacher_layers", None) or range(n))
        cut = cut_student(hf_model(student), keep)
        cut.config.kdistill_teacher_layers = [int(source[i]) for i in keep]
        for p in cut.parameters():
            p.requires_grad_(True)
        sc = self.ctx.cfg.student
        if sc is not None and sc.freeze_embeddings:
            cut.get_input_embeddings().weight.requires_grad_(False)
        return cut

    def fit(self, student, runner):
        ctx, pc = self.ctx, self.pc
        feats, _ = encode_examples(ctx.renderer, ctx.train_examples)
        tcfg = train_config(ctx.cfg.train, max_steps=pc.steps_per_stage)
        sizes = [num_layers(student)] + list(pc.layers)
        t0, steps, resumed = time.time(), 0, None
        previous = None
        dirs = []
        for k, n in enumerate(sizes):
            sdir = self.root / f"stage-{k}-{n}"
            dirs.append((f"stage-{k}", sdir))
            was = student
            # a finished stage's saved config has its size and block map
            student, summary = run_stage(sdir, lambda: self._stage(k, n, was, previous, feats, tcfg, sdir, runner),
                                         lambda done: load_saved(was, sdir / "student"))
            self.stages.append(summary)
            steps += summary["steps"]
            if resumed is None and summary.get("finished_earlier"):
                resumed = f"stage {k} (finished earlier)"
            elif resumed is None and summary.get("resumed_from") is not None:
                resumed = f"stage {k} step {summary['resumed_from']}"
            previous = student
        combine_metrics(ctx.output_dir, dirs)
        return student, {"steps": steps, "seconds": round(time.time() - t0, 1), "train_rows": len(feats),
                         "resumed_from": resumed, "stopped_early": False}

    def _stage(self, k: int, n: int, student, previous, feats, tcfg, sdir: Path, runner):
        """Stage ``k``: cut ``previous`` to ``n`` blocks (k > 0) and distill into it; ``(student, summary)``."""
        ctx, pc = self.ctx, self.pc
        if k > 0:
            student = self._cut(previous, n, feats)
        teacher = ctx.teacher
        if k > 0 and pc.teacher == "previous":
            teacher = LocalTeacher(copy.deepcopy(hf_model(previous)), ctx.vocab_size, name=f"stage-{k - 1}",
                                   device=ctx.device)
        who = "the teacher" if teacher is ctx.teacher else f"stage {k - 1}'s student"
        runner.say(f"progressive stage {k}/{len(pc.layers)}: {n} layers "
                   f"{getattr(student.config, 'kdistill_teacher_layers', None)}, distilled from {who}")
        stage_ctx = copy.copy(ctx)
        stage_ctx.teacher, stage_ctx.student = teacher, student
        method = LogitMethod(stage_ctx)
        student.to(ctx.device)
        student, result = runner.train(student, method, feats, sdir, tcfg=tcfg)
        save_model(student, sdir / "student")
        summary = {"stage": k, "layers": n, "teacher_layers": getattr(student.config, "kdistill_teacher_layers", None),
                   "params": count_params(student), "teacher": "original" if teacher is ctx.teacher else f"stage-{k - 1}",
                   "steps": result.steps, "resumed_from": result.resumed_from, "heldout": runner.evaluate(student)}
        return student, summary

    def summary(self) -> dict:
        return {"teacher": self.pc.teacher, "layer_selection": self.pc.layer_selection, "stages": self.stages}

