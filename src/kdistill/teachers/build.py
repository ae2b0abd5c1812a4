"""Build the run's teacher signal from the config: a local model, an offline cache, or several.

* ``teacher: {model: M}``: the model runs next to the student (:class:`LocalTeacher`).
* ``teacher: {cache: C}``: the signal is read from the cache (:class:`CachedTeacher`); no teacher
  model is loaded. The student must then be ``student.model`` (a student cut from the teacher
  needs the teacher's weights), and teacher-relative metrics (KL to the teacher, top-1 agreement,
  teacher accuracy) are reported as unavailable.
* ``teacher: {model: M, cache: C}``: the signal is read from the cache; M is loaded only to cut the
  student (``student.init``) and to evaluate the teacher and the initial student, freed while the
  student trains, and loaded again for the final evaluation.
* ``teacher: {api: {..., logprobs: K}}``: the teacher's top-K log-probs come from a vLLM server
  (:class:`~kdistill.teachers.api_logprobs.ApiLogprobTeacher`; methods logit and on_policy train on
  them, on_policy_filter and self_distill score candidates with them); no teacher model is loaded
  and the student is ``student.model``. Methods that need only text (zephyr) use its chat side.
* ``teachers: [...]``: several of the above with weights (:class:`MultiTeacher`). The first
  teacher with a ``model`` is "the teacher" of the report and the one a student is cut from.

Every teacher must share the student's tokenizer (a clear error otherwise).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from kdistill.errors import ConfigError, ModelError

log = logging.getLogger("kdistill")

CACHE_METHODS = ("logit",)  # methods that train on the dataset's own sequences (what a cache covers)
# methods that can work with a text-only teacher (teacher.api alone): its answers and its ratings
TEXT_TEACHER_METHODS = ("zephyr", "on_policy_filter", "self_distill")
# methods a served teacher's top-k log-probs can train (logit, on_policy) or score candidates for (the rounds)
LOGPROB_API_METHODS = ("logit", "on_policy", "on_policy_filter", "self_distill")


def api_logprobs(spec) -> bool:
    """This teacher's signal is top-k log-probs from a vLLM server (``api.logprobs``, no model or cache)."""
    api = getattr(spec, "api", None)
    return api is not None and api.logprobs is not None and spec.model is None and spec.cache is None


def _served_method_error(key: str, method: str) -> ConfigError:
    return ConfigError(f"{key}.api.logprobs: a served teacher's log-probs serve methods {', '.join(LOGPROB_API_METHODS)}; "
                       f"method {method} cannot use them")


def api_text_only(cfg) -> bool:
    """The teacher is an API and nothing else (no model, no cache, one teacher)."""
    return (not cfg.teachers and cfg.teacher.api is not None and cfg.teacher.model is None
            and cfg.teacher.cache is None)


def text_teacher_only(cfg) -> bool:
    """The run uses the teacher only as text over HTTP (its answers and ratings): an API-only teacher
    with a method that needs no more, or whose log-probs (``api.logprobs``) this method cannot use."""
    return (api_text_only(cfg) and cfg.method in TEXT_TEACHER_METHODS
            and not (api_logprobs(cfg.teacher) and cfg.method in LOGPROB_API_METHODS))


def http_teacher(cfg, vocab_size: int):
    """The teacher object when the run's one teacher is an HTTP API: the text teacher
    (:func:`text_teacher_only`), a served one giving log-probs, or None (not an API-only teacher)."""
    if text_teacher_only(cfg):
        from kdistill.teachers.api import ApiTextTeacher

        return ApiTextTeacher(cfg.teacher.api, cfg.data.system_prompt)
    if not cfg.teachers and api_logprobs(cfg.teacher) and cfg.method in LOGPROB_API_METHODS:
        from kdistill.teachers.api_logprobs import ApiLogprobTeacher

        return ApiLogprobTeacher(cfg.teacher.api, vocab_size, system_prompt=cfg.data.system_prompt)
    return None


def teacher_configs(cfg) -> list:
    """The configured teachers: ``teachers`` when given, else ``[teacher]``."""
    return list(cfg.teachers) if cfg.teachers else [cfg.teacher]


def primary_teacher(cfg):
    """The teacher whose model the report compares against and students are cut from (or None)."""
    for t in teacher_configs(cfg):
        if t.model is not None:
            return t
    return None


def needs_primary_model(cfg) -> bool:
    """True when the primary teacher model produces training signal (it is not only a cache)."""
    prim = primary_teacher(cfg)
    return prim is not None and prim.cache is None


def _key(cfg, i: int) -> str:
    return f"teachers[{i}]" if cfg.teachers else "teacher"


def load_student_only(cfg, say: Callable[[str], None] = log.info):
    """:class:`~kdistill.pipeline.Models` without a teacher model (every teacher is a cache)."""
    from kdistill.cache import TopKCache
    from kdistill.models import load_model, output_vocab_size
    from kdistill.pipeline import Models

    specs = teacher_configs(cfg)
    served = [t for t in specs if api_logprobs(t)] if cfg.method in LOGPROB_API_METHODS else []
    text_only = text_teacher_only(cfg)
    if any(api_logprobs(t) for t in specs) and not served and not text_only:
        raise _served_method_error("teacher", cfg.method)
    if text_only and api_logprobs(cfg.teacher):
        say(f"teacher.api.logprobs is not used by method {cfg.method}: it needs the teacher's answers and ratings")
    if not any(t.cache for t in specs) and not text_only and not served:
        if getattr(cfg.teacher, "api", None) is not None:
            raise ConfigError(
                f"teacher.api: method {cfg.method} needs the teacher's token distributions, which an API does not give; "
                f"use method: sequence (the teacher's answers), {', '.join(TEXT_TEACHER_METHODS)} (its answers and "
                "ratings), or teacher.model / teacher.cache"
            )
        raise ConfigError("teacher.model: required for this method (hub id, folder, .gguf file, or 'demo'), or teacher.cache")
    if cfg.student is None:
        raise ConfigError("student: required key is missing (student.model when the teacher is only a cache)")
    what = "an API" if text_only or served else "a cache"
    if cfg.student.model is None:
        raise ConfigError(
            f"student.model: required when the teacher is only {what} (student.init cuts the student from the "
            "teacher's weights: give teacher.model too, or a student.model)"
        )
    student, tok = load_model(cfg.student.model, "student.model", cfg.student.dtype, cfg.student.revision,
                              cfg.student.trust_remote_code)
    if cfg.student.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    vocab = min(output_vocab_size(student), len(tok))
    if text_only:
        name = f"api:{cfg.teacher.api.model} @ {cfg.teacher.api.base_url}"
        say(f"teacher: {name} (text only: its answers and ratings; no token probabilities)")
        return Models(None, student, tok, vocab, name, cfg.student.model)
    names = [f"{TopKCache(t.cache).teacher} (cache {t.cache})" if t.cache else
             f"api:{t.api.model} @ {t.api.base_url} (top-{t.api.logprobs} log-probs)" for t in specs]
    say(f"teacher: {', '.join(names)}; no teacher model is loaded")
    return Models(None, student, tok, vocab, " + ".join(names), cfg.student.model)


def build_teacher(cfg, m, features: list[dict], device=None, say: Callable[[str], None] = log.info):
    """The teacher object a method asks for signal (``signal(batch, hidden)``).

    Args:
        m: the run's :class:`~kdistill.pipeline.Models` (``m.teacher`` is the primary teacher model
            or None, ``m.tokenizer`` the student's tokenizer, ``m.vocab_size`` the shared vocabulary).
        features: the encoded training rows; every cache is checked against them before training.
    """
    from kdistill.models import check_vocab, load_model, tokenizer_fingerprint
    from kdistill.teachers.cache import CachedTeacher
    from kdistill.teachers.local import LocalTeacher
    from kdistill.teachers.multi import MultiTeacher

    if text_teacher_only(cfg):
        return http_teacher(cfg, m.vocab_size)
    specs = teacher_configs(cfg)
    prim = primary_teacher(cfg)
    built, names = [], []
    for i, spec in enumerate(specs):
        key = _key(cfg, i)
        if api_logprobs(spec):
            from kdistill.teachers.api_logprobs import ApiLogprobTeacher

            if cfg.method not in LOGPROB_API_METHODS:
                raise _served_method_error(key, cfg.method)
            if cfg.features.weight > 0:
                raise ConfigError(f"features: feature distillation needs the teacher's hidden states; {key} is served "
                                  "over HTTP (log-probs only)")
            t = ApiLogprobTeacher(spec.api, m.vocab_size, system_prompt=cfg.data.system_prompt)
            checked = t.check_tokenizer(m.tokenizer)
            say(f"{key}: {t.name}; {checked}")
            names.append(f"api:{spec.api.model}")
        elif spec.cache is not None:
            if cfg.method not in CACHE_METHODS:
                raise ConfigError(
                    f"{key}.cache: a teacher cache holds the teacher's signal on the dataset's own sequences; method "
                    f"{cfg.method} trains on other sequences (use {key}.model, or method: {'/'.join(CACHE_METHODS)})"
                )
            t = CachedTeacher.open(spec.cache, m.tokenizer, m.vocab_size, features, key=f"{key}.cache")
            say(f"{key}: top-{t.top_k} cache {spec.cache} ({len(t.cache):,} rows, "
                f"{t.cache.bytes_per_token():.0f} bytes/token) checked against {len(features)} training rows")
            names.append(f"{t.cache.teacher} (cache)")
        elif spec is prim:
            if m.teacher is None:
                raise ConfigError(f"{key}.model: the teacher model is not loaded")
            t = LocalTeacher(m.teacher, m.vocab_size, name=m.teacher_name, device=device)
            names.append(spec.model)
        else:
            model, tok = load_model(spec.model, f"{key}.model", spec.dtype, spec.revision, spec.trust_remote_code)
            if tokenizer_fingerprint(tok) != tokenizer_fingerprint(m.tokenizer):
                raise ModelError(
                    f"{key}.model: {spec.model} has a different tokenizer than the student; every teacher must share "
                    "the student's tokenizer for logit distillation"
                )
            shared = check_vocab(tok, m.tokenizer, model, m.student)
            if shared < m.vocab_size:
                raise ModelError(f"{key}.model: its vocabulary ({shared}) is smaller than the run's ({m.vocab_size})")
            t = LocalTeacher(model, m.vocab_size, name=spec.model, device=device)
            names.append(spec.model)
        built.append(t)
    if len(built) == 1:
        return built[0]
    multi = MultiTeacher(built, [s.weight for s in specs], cfg.loss.teacher_mix, names)
    say(f"teachers: {len(built)} ({', '.join(f'{n} w={w:.2f}' for n, w in zip(names, multi.weights))}), "
        f"combined as {cfg.loss.teacher_mix}")
    return multi


def scores_new_sequences(teacher) -> bool:
    """Whether ``teacher`` gives a signal for any sequence (a model here, or one served over HTTP),
    not only for the dataset's own rows (a cache)."""
    from kdistill.teachers.api_logprobs import ApiLogprobTeacher

    subs = getattr(teacher, "teachers", None)
    if subs is not None:
        return all(scores_new_sequences(t) for t in subs)
    return getattr(teacher, "model", None) is not None or isinstance(teacher, ApiLogprobTeacher)


def uses_model(teacher, model) -> bool:
    """Whether ``teacher`` (possibly a :class:`MultiTeacher`) runs ``model``."""
    if teacher is None or model is None:
        return False
    subs = getattr(teacher, "teachers", None)
    if subs is not None:
        return any(uses_model(t, model) for t in subs)
    return getattr(teacher, "model", None) is model


def reload_teacher(cfg, device=None) -> Optional[object]:
    """Load the primary teacher model again (after training from a cache, for the final evaluation)."""
    from kdistill.models import load_model

    prim = primary_teacher(cfg)
    if prim is None:
        return None
    model, _ = load_model(prim.model, "teacher.model", prim.dtype, prim.revision, prim.trust_remote_code,
                          with_tokenizer=False)
    if device is not None:
        model.to(device)
    return model
