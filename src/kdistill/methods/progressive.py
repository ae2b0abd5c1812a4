"""``method: progressive``: shrink the student in stages, distilling at every size.

Each stage lives in ``OUTPUT/progressive/stage-K-<layers>/`` (its own checkpoints, ``metrics.jsonl``,
``student/`` and ``done.json``; a finished stage is skipped on rerun, an interrupted one resumes):

* stage 0 trains the student the pipeline built (``student.init`` or ``student.model``) with the
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

from kdistill.data import collate, encode_examples
from kdistill.feedback import hf_model, load_saved, mark_done, save_model, stage_done
from kdistill.methods import register
from kdistill.methods.base import Method, RunContext
from kdistill.methods.logit import LogitMethod
from kdistill.models import count_params, cut_student, layer_importance, num_layers, select_layers
from kdistill.stages import combine_metrics, train_config
from kdistill.teachers.local import LocalTeacher


class Progressive(Method):
    name = "progressive"

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
            done = stage_done(sdir)
            if done is not None:  # its saved config has the stage's size and block map
                student = load_saved(student, sdir / "student")
                self.stages.append(done)
                steps += done["steps"]
                resumed = resumed or f"stage {k} (finished earlier)"
                previous = student
                continue
            if k > 0:
                student = self._cut(previous, n, feats)
            teacher = ctx.teacher
            if k > 0 and pc.teacher == "previous":
                teacher = LocalTeacher(copy.deepcopy(hf_model(previous)), ctx.vocab_size, name=f"stage-{k - 1}",
                                       device=ctx.device)
            who = "the teacher" if teacher is ctx.teacher else f"stage {k - 1}'s student"
            runner.say(f"progressive stage {k}/{len(sizes) - 1}: {n} layers "
                       f"{getattr(student.config, 'kdistill_teacher_layers', None)}, distilled from {who}")
            stage_ctx = copy.copy(ctx)
            stage_ctx.teacher, stage_ctx.student = teacher, student
            method = LogitMethod(stage_ctx)
            student.to(ctx.device)
            student, result = runner.train(student, method, feats, sdir, tcfg=tcfg)
            save_model(student, sdir / "student")
            if result.resumed_from is not None and resumed is None:
                resumed = f"stage {k} step {result.resumed_from}"
            summary = {"stage": k, "layers": n, "teacher_layers": getattr(student.config, "kdistill_teacher_layers", None),
                       "params": count_params(student), "teacher": "original" if teacher is ctx.teacher else f"stage-{k - 1}",
                       "steps": result.steps, "resumed_from": result.resumed_from,
                       "heldout": runner.evaluate(student)}
            mark_done(sdir, summary)
            self.stages.append(summary)
            steps += result.steps
            if teacher is not ctx.teacher:
                del teacher
            previous = student
        combine_metrics(ctx.output_dir, dirs)
        return student, {"steps": steps, "seconds": round(time.time() - t0, 1), "train_rows": len(feats),
                         "resumed_from": resumed, "stopped_early": False}

    def summary(self) -> dict:
        return {"teacher": self.pc.teacher, "layer_selection": self.pc.layer_selection, "stages": self.stages}


@register("progressive")
def _build(ctx: RunContext) -> Progressive:
    return Progressive(ctx)
