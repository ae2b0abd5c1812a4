"""The student of a run: a given model (``student.model``), or one cut from the teacher (``student.init``).

A cut keeps some of the teacher's decoder blocks (``num_layers``, chosen by ``layer_selection``;
``importance`` scores the blocks on sample training rows). The kept layers are written to
``OUTPUT/student_layers.json`` the first time, so a resumed run keeps the layers it chose first
(importance scores could shift once the data changes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from kdistill.data import Example, Renderer, collate
from kdistill.errors import ConfigError
from kdistill.models import cut_student, layer_importance, load_model, num_layers, select_layers
from kdistill.store import atomic_write, read_json

log = logging.getLogger("kdistill")

LAYERS_FILE = "student_layers.json"


def display_name(spec: str) -> str:
    """How a model spec is named in reports ("demo" is the bundled SmolLM2 GGUF)."""
    return "HuggingFaceTB/SmolLM2-135M-Instruct (bundled Q4_1 GGUF)" if spec == "demo" else spec


def ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i == len(idx) - 1 or idx[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def importance_scores(teacher, tok, renderer: Renderer, rows: list[Example]) -> list[float]:
    """Block Influence of each teacher block on ``rows`` (see :func:`kdistill.models.layer_importance`)."""
    feats = [renderer.encode(r) for r in rows]
    batches = [collate(feats[i: i + 8], tok.pad_token_id) for i in range(0, len(feats), 8)]
    return layer_importance(teacher, batches)


def cut_from_teacher(cfg, teacher, tok, renderer: Renderer, train_rows: list[Example], output_dir: Path,
                     say: Callable[[str], None] = log.info, teacher_spec: str = "teacher"):
    """``student.init``: the student cut from ``teacher`` -> ``(student, kept layers, name)``."""
    init = cfg.student.init
    n_total = num_layers(teacher)
    saved = Path(output_dir) / LAYERS_FILE
    layers = (read_json(saved) or {}).get("layers")
    if layers is None:
        scores = None
        if init.layer_selection == "importance":
            if not train_rows:
                raise ConfigError("student.init.layer_selection: importance needs data.train rows to score layers")
            scores = importance_scores(teacher, tok, renderer, train_rows[: init.importance_samples])
        n_keep = init.num_layers if init.num_layers is not None else max(1, n_total // 2)
        layers = select_layers(n_total, n_keep, init.layer_selection, scores)
        atomic_write(saved, json.dumps({"layers": layers, "importance": scores}))
    student = cut_student(teacher, layers)
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.student.dtype not in ("auto", "float32"):
        student.to(getattr(torch, cfg.student.dtype))
    say(f"student cut from the teacher: {len(layers)} of {n_total} layers {layers}")
    return student, layers, f"{display_name(teacher_spec)} [layers {ranges(layers)}]"


def build_student(cfg, t_weights, renderer_for: Callable, train_rows: list[Example], output_dir: Path,
                  say: Callable[[str], None], teacher_is: Optional[str] = None):
    """``(student, tokenizer, name, kept teacher layers or None)`` for the run.

    ``t_weights``: the primary teacher's ``(model, tokenizer)`` or None; ``renderer_for(tok)`` makes
    the run's renderer; ``teacher_is``: what the teacher is when it has no weights here ("a cache",
    "an API"), for the error when a cut is asked for.
    """
    sc = cfg.student
    if sc is None:
        raise ConfigError("student: required key is missing (student.model, or student.init to cut one from the teacher)")
    if sc.model is not None:
        model, tok = load_model(sc.model, "student.model", sc.dtype, sc.revision, sc.trust_remote_code)
        student, name, layers = model, sc.model, None
    elif sc.init.from_ is not None:  # a local copy of the (e.g. served) teacher's weights
        src = load_model(sc.init.from_, "student.init.from", "float32", None, sc.trust_remote_code)
        student, layers, name = cut_from_teacher(cfg, src[0], src[1], renderer_for(src[1]), train_rows, output_dir, say,
                                                 sc.init.from_)
        tok = src[1]
        del src
    else:
        if t_weights is None:
            if teacher_is is not None:
                raise ConfigError(
                    f"student.model: required when the teacher is only {teacher_is} (student.init cuts the student "
                    "from the teacher's weights: give student.init.from (a local copy of them), or a student.model)")
            raise ConfigError("student.init: cutting a student needs a local teacher.model; give teacher.model, "
                              "or a student.model")
        teacher, tok = t_weights
        spec = next((t.model for t in (cfg.teachers or [cfg.teacher]) if t.model is not None), "teacher")
        student, layers, name = cut_from_teacher(cfg, teacher, tok, renderer_for(tok), train_rows, output_dir, say,
                                                 spec)
    if sc.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    return student, tok, name, layers
