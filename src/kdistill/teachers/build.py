"""Build the run's teacher from the config: each ``teacher:`` section goes to the first registered
kind that accepts it (by priority), several sections (``teachers:``) become one
:class:`~kdistill.teachers.multi.MultiTeacher`.

* ``{api: {..., logprobs: K}}`` — :class:`~kdistill.teachers.served.ServedTeacher`: top-K log-probs
  from a vLLM server (or only its chat side, for a method that needs just answers and ratings);
* ``{cache: C}`` (``model`` optional) — :class:`~kdistill.teachers.cache.CachedTeacher`: the signal
  is read from the cache; a ``model`` beside it is loaded only to cut the student and to measure
  the teacher, and freed while the student trains;
* ``{model: M}`` — :class:`~kdistill.teachers.local.LocalTeacher`: the model runs next to the student;
* ``{api: {...}}`` — :class:`~kdistill.teachers.text.ApiTextTeacher`: answers and ratings only.

The first section with a ``model`` is the *primary* teacher: its weights are loaded by the run
(to cut a student and to measure the teacher) and it is the teacher of the report.

A section whose tokenizer differs from the student's becomes a
:class:`~kdistill.teachers.cross.CrossTokenizerTeacher` (``loss.cross_tokenizer``), or a one-line
refusal without that setting.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from kdistill.models import count_params, load_model, num_layers
from kdistill.teachers.base import BuildEnv, Teacher, kind_for
from kdistill.teachers.cross import cross_teacher
from kdistill.teachers.multi import MultiTeacher


def teacher_configs(cfg) -> list:
    """The configured teachers: ``teachers`` when given, else ``[teacher]``."""
    return list(cfg.teachers) if cfg.teachers else [cfg.teacher]


def config_key(cfg, i: int) -> str:
    return f"teachers[{i}]" if cfg.teachers else "teacher"


def primary_teacher(cfg):
    """The teacher whose model the report compares against and students are cut from (or None)."""
    for t in teacher_configs(cfg):
        if t.model is not None:
            return t
    return None


def configured(spec) -> bool:
    return spec.model is not None or spec.cache is not None or spec.api is not None or spec.kind is not None


def load_teacher_weights(cfg, say: Callable[[str], None], with_tokenizer: bool = True):
    """The primary teacher's ``(model, tokenizer)``, or None when no teacher has a model."""
    prim = primary_teacher(cfg)
    if prim is None:
        return None
    t0 = time.time()
    model, tok = load_model(prim.model, "teacher.model" if prim is cfg.teacher else "teachers[].model", prim.dtype,
                            prim.revision, prim.trust_remote_code, with_tokenizer=with_tokenizer)
    if with_tokenizer:
        try:
            layers = str(num_layers(model))
        except Exception:  # noqa: BLE001 - only for the message
            layers = "?"
        say(f"teacher {prim.model}: {count_params(model):,} parameters, {layers} layers ({time.time() - t0:.1f} s)")
    return model, tok


def build_teacher(cfg, env: BuildEnv) -> Optional[Teacher]:
    """The teacher object a method asks for signal, text or scores; None when no teacher is configured."""
    specs = [(i, s) for i, s in enumerate(teacher_configs(cfg)) if configured(s)]
    if not specs:
        return None
    built, names = [], []
    for i, spec in specs:
        key = config_key(cfg, i)
        kind = kind_for(spec)
        if kind is None:  # pragma: no cover - the config checks teacher.kind
            raise ValueError(f"{key}: no teacher kind accepts this section")
        t = cross_teacher(spec, key, env) or kind.build(spec, key, env)  # another tokenizer: loss.cross_tokenizer
        built.append(t)
        names.append(t.name)
    if len(built) == 1:
        return built[0]
    multi = MultiTeacher(built, [s.weight for _, s in specs], cfg.loss.teacher_mix, names)
    env.say(f"teachers: {len(built)} ({', '.join(f'{n} w={w:.2f}' for n, w in zip(names, multi.weights))}), "
            f"combined as {multi.mode}" + (" (their tokenizers differ)" if multi.mode != cfg.loss.teacher_mix else ""))
    return multi


def uses_model(teacher: Optional[Teacher], model) -> bool:
    """Whether ``teacher`` (possibly several) runs ``model``."""
    if teacher is None or model is None:
        return False
    subs = getattr(teacher, "teachers", None)
    if subs is not None:
        return any(uses_model(t, model) for t in subs)
    return teacher.model is model
