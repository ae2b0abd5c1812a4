"""The student of a run: a given model (``student.model``), or one cut from the teacher (``student.init``).

A cut keeps some of the teacher's decoder blocks (``num_layers``, chosen by ``layer_selection``;
``importance`` scores the blocks on sample training rows), optionally prunes their width
(``width``: MLP channels, head groups, hidden channels; :mod:`kdistill.models.width`), or lets a
search pick the depth/width split at a parameter budget (``search``; :mod:`kdistill.cut_search`).
A mixture-of-experts teacher is first made dense (``moe: dense``; :mod:`kdistill.models.moe`).
What was kept (blocks, experts, channels, the search's comparison) is written to
``OUTPUT/student_layers.json`` the first time, so a resumed run rebuilds the same student
(importance scores could shift once the data changes); a file from an older run (blocks only)
still reads. ``student.lora`` then wraps the student in LoRA adapters (:mod:`kdistill.models.lora`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from kdistill.cut_search import build_cut, search_cut
from kdistill.data import Example, Renderer, collate
from kdistill.errors import ConfigError
from kdistill.models import count_params, layer_importance, load_model, num_layers, output_vocab_size, select_layers
from kdistill.models.lora import apply_lora, base_params, describe_lora, is_lora, save_lora_student, trainable_params
from kdistill.models.moe import densify, expert_usage, is_moe, param_counts, top_experts
from kdistill.models.width import width_plan, width_scores
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


def sample_batches(tok, renderer: Renderer, rows: list[Example], device=None) -> list[dict]:
    """``rows`` encoded and batched by 8 (for importance scores)."""
    feats = [renderer.encode(r) for r in rows]
    batches = [collate(feats[i: i + 8], tok.pad_token_id) for i in range(0, len(feats), 8)]
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v) for k, v in b.items()}
            for b in batches]


def importance_scores(teacher, tok, renderer: Renderer, rows: list[Example]) -> list[float]:
    """Block Influence of each teacher block on ``rows`` (see :func:`kdistill.models.layer_importance`)."""
    return layer_importance(teacher, sample_batches(tok, renderer, rows, next(teacher.parameters()).device))


def _width_summary(plan: dict) -> dict:
    return {a: {"fraction": v["fraction"], "size": v["size"]} for a, v in plan.items()}


def cut_from_teacher(cfg, teacher, tok, renderer: Renderer, train_rows: list[Example], output_dir: Path,
                     say: Callable[[str], None] = log.info, teacher_spec: str = "teacher"):
    """``student.init``: the student cut from ``teacher`` -> ``(student, kept layers, name)``."""
    init = cfg.student.init
    n_total = num_layers(teacher)
    path = Path(output_dir) / LAYERS_FILE
    saved = read_json(path) or {}
    fractions = init.width.fractions() if init.width is not None else {}
    if saved.get("layers") is not None:  # a resumed run: the same student as the first time
        kept = {a: v["fraction"] for a, v in (saved.get("width") or {}).items()}
        if init.search is None and kept != fractions:
            raise ConfigError(f"student.init.width: {path} kept {kept or 'the full width'} for this run; a resumed "
                              "run cannot change it (use a new output_dir)")
        if init.search is not None and not saved.get("search"):
            raise ConfigError(f"student.init.search: {path} was cut without a search; a resumed run cannot search "
                              "(use a new output_dir)")
    device = next(teacher.parameters()).device
    cache: dict = {}

    def batches():
        if not train_rows:
            raise ConfigError("student.init.layer_selection: importance needs data.train rows to score layers"
                              if init.layer_selection == "importance" else
                              "student.init: scoring importance (width, experts, search) needs data.train rows")
        if "b" not in cache:
            cache["b"] = sample_batches(tok, renderer, train_rows[: init.importance_samples], device)
        return cache["b"]

    base, experts = teacher, saved.get("experts")
    if is_moe(teacher) and init.moe == "dense":
        experts = experts or top_experts(expert_usage(teacher, batches()))
        base = densify(teacher, experts)
    layers, scores, search = saved.get("layers"), saved.get("importance"), saved.get("search")
    plan = (saved.get("width") or {}) if layers is not None else None
    fresh = layers is None
    if fresh:
        if init.layer_selection == "importance":
            scores = layer_importance(teacher, batches())

        def layers_for(n: int) -> list[int]:
            return select_layers(n_total, n, init.layer_selection, scores)

        if init.search is not None:
            feats = [renderer.encode(r) for r in train_rows]
            vocab = min(output_vocab_size(teacher), len(tok))
            lr = init.search.learning_rate or cfg.train.learning_rate
            layers, plan, search = search_cut(init.search, teacher, base, layers_for, width_scores(base, batches()),
                                              feats, tok.pad_token_id, vocab, lr, cfg.train.batch_size,
                                              cfg.train.seed, say)
        else:
            n_keep = init.num_layers if init.num_layers is not None else (n_total if fractions else max(1, n_total // 2))
            layers = layers_for(n_keep)
    if plan is None:
        plan = width_plan(base, width_scores(base, batches()), layers, fractions) if fractions else {}
    if fresh:
        atomic_write(path, json.dumps({"layers": layers, "importance": scores, "experts": experts, "width": plan,
                                       "search": search}))
    student = build_cut(base, layers, plan)
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.student.dtype not in ("auto", "float32"):
        student.to(getattr(torch, cfg.student.dtype))
    what = f"{len(layers)} of {n_total} layers {layers}"
    if plan:
        what += ", width " + ", ".join(f"{a} {v['size']}" for a, v in plan.items())
    if experts is not None and base is not teacher:
        what += ", dense (each block's most-used expert)"
    say(f"student cut from the teacher: {what}")
    name = f"{display_name(teacher_spec)} [layers {ranges(layers)}" + (
        "; " + ", ".join(f"{a} {v['fraction']:g}" for a, v in plan.items()) if plan else "") + (
        "; dense" if base is not teacher else "") + "]"
    return student, layers, name


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
    if sc.lora is not None:
        _check_lora_engines(cfg)
        student = apply_lora(student, sc.lora, cfg.train.seed)
        say(f"student: LoRA r={sc.lora.r} on {sc.lora.target_modules}: {trainable_params(student):,} trainable of "
            f"{count_params(student):,} parameters")
        name += f" + LoRA r={sc.lora.r}"
    return student, tok, name, layers


def _check_lora_engines(cfg) -> None:
    """A LoRA student is sampled with transformers only (vLLM's weight sync takes plain models)."""
    for key in type(cfg).model_fields:
        section = getattr(cfg, key, None)
        if key not in ("teacher", "teachers") and getattr(section, "engine", None) == "vllm":
            raise ConfigError(f"{key}.engine: a LoRA student (student.lora) is sampled with transformers; "
                              "set engine: transformers")


def student_facts(student, cfg, output_dir: Path) -> dict:
    """The report's ``student`` entries beyond name and layers: ``params`` (as saved, merged),
    ``params_active``, ``trainable_params``, and ``init`` / ``lora`` when they apply."""
    counts = param_counts(student)
    out = {"params": base_params(student) if is_lora(student) else counts["params"],
           "params_active": counts["params_active"], "trainable_params": trainable_params(student)}
    if is_lora(student):
        out["params_active"] = out["params"]
        out["lora"] = describe_lora(student, cfg.student.lora)
    saved = read_json(Path(output_dir) / LAYERS_FILE) if cfg.student is not None and cfg.student.init else None
    if saved:
        init = {"layers": saved.get("layers")}
        if saved.get("width"):
            init["width"] = _width_summary(saved["width"])
        if saved.get("experts") is not None:
            init["experts"] = saved["experts"]
        if saved.get("search"):
            init["search"] = saved["search"]
        out["init"] = init
    return out


def save_student(student, tok, folder: Path, cfg) -> None:
    """Save the trained student (a LoRA student merged unless ``student.lora.merge: false``)."""
    folder = Path(folder)
    if is_lora(student):
        sc = cfg.student
        source = None
        if sc.model is not None:
            p = Path(sc.model).expanduser()
            source = str(p.resolve()) if p.exists() and p.is_dir() else (None if sc.model == "demo" or p.suffix == ".gguf"
                                                                          else sc.model)
        save_lora_student(student, folder, sc.lora, source)
    else:
        student.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
