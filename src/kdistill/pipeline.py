"""config -> models -> data -> method -> trainer -> student/ + report. One direction.

:func:`run` is ``kdistill run``; :func:`evaluate_only` is ``kdistill eval``. Both write
``report.json``, ``report.md`` and plots into ``output_dir``. Every user mistake raises a
:class:`~kdistill.errors.KDistillError` before any training starts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kdistill.config import Config, check_paths, dump_config
from kdistill.data import (Example, Renderer, collate, encode_examples, load_examples, mix_tasks, split_examples,
                           tag_task, task_of)
from kdistill.errors import ConfigError, DataError
from kdistill.evaluate import by_task, logit_metrics, measure_speed, scored_answers, task_accuracy
from kdistill.models import (
    check_vocab,
    count_params,
    cut_student,
    layer_importance,
    load_model,
    num_layers,
    select_layers,
)
from kdistill.report import build_report, model_card, write_report

log = logging.getLogger("kdistill")


@dataclass
class Models:
    teacher: Any
    student: Any
    tokenizer: Any
    vocab_size: int
    teacher_name: str
    student_name: str
    teacher_layers: Optional[list[int]] = None
    extra: dict = field(default_factory=dict)


def load_data(cfg: Config, require_train: bool = True, require_response: bool = True,
              mixture: Optional[dict] = None, train_path: Optional[str] = None) -> tuple[list[Example], list[Example]]:
    """Training rows and held-out rows (``data.eval``, or a deterministic split of ``data.train``).

    ``require_response=False``: prompt-only rows are accepted (methods that write their own answers).
    With ``data.tasks``: every task's rows (ids ``task/ID``, ``extra["task"]``), held out per task
    (at most ``data.max_eval_rows`` each), the training rows mixed by the tasks' weights
    (:func:`kdistill.data.mix_tasks`); ``mixture`` (a dict) receives the per-task counts.
    ``train_path`` replaces ``data.train`` (e.g. the teacher's answers just generated).
    """
    if cfg.data.tasks is not None:
        train, held = [], []
        for t in cfg.data.tasks:
            rows = tag_task(load_examples(t.train, require_response=require_response), t.name)
            if t.eval is not None:
                h = tag_task(load_examples(t.eval, require_response=require_response), t.name)
            else:
                rows, h = split_examples(rows, cfg.data.eval_fraction, cfg.train.seed)
            train += rows
            held += h[: cfg.data.max_eval_rows]
        stats = {t.name: {"rows": sum(task_of(e) == t.name for e in train)} for t in cfg.data.tasks}
        if all(t.weight is not None for t in cfg.data.tasks):
            train, stats = mix_tasks(train, {t.name: t.weight for t in cfg.data.tasks}, cfg.train.seed)
        if mixture is not None:
            mixture.update(stats)
        return train, held
    train: list[Example] = []
    train_path = train_path or cfg.data.train
    if train_path is not None:
        train = load_examples(train_path, require_response=require_response)
    elif require_train:
        raise ConfigError("data.train: required key is missing (a JSONL file of prompt/response rows; for method "
                          "sequence, teacher-written rows from `kdistill generate`, or a generate: section)")
    if cfg.data.eval is not None:
        held = load_examples(cfg.data.eval, require_response=require_response)
    elif train:
        train, held = split_examples(train, cfg.data.eval_fraction, cfg.train.seed)
    else:
        raise ConfigError("data.eval: required key is missing (or give data.train to hold out a split)")
    return train, held[: cfg.data.max_eval_rows]


def _renderer(cfg: Config, tokenizer) -> Renderer:
    return Renderer(tokenizer, cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template)


def cut_from_teacher(cfg: Config, teacher, tok, train_rows: list[Example], output_dir: Path,
                     say: Callable[[str], None] = log.info) -> tuple[Any, list[int], str]:
    """``student.init``: the student cut from ``teacher`` -> ``(student, kept layers, name)``.

    The kept layers are saved in ``output_dir/student_layers.json`` on first use, so a resumed run
    keeps the layers it chose first (importance scores can shift once training data changes).
    """
    init = cfg.student.init
    n_total = num_layers(teacher)
    saved = output_dir / "student_layers.json"
    if saved.is_file():
        layers = json.loads(saved.read_text())["layers"]
    else:
        scores = None
        if init.layer_selection == "importance":
            if not train_rows:
                raise ConfigError("student.init.layer_selection: importance needs data.train rows to score layers")
            scores = _importance(teacher, tok, cfg, train_rows[: init.importance_samples])
        n_keep = init.num_layers if init.num_layers is not None else max(1, n_total // 2)
        layers = select_layers(n_total, n_keep, init.layer_selection, scores)
        output_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"layers": layers, "importance": scores}))
    student = cut_student(teacher, layers)
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.student.dtype not in ("auto", "float32"):
        student.to(getattr(torch, cfg.student.dtype))
    say(f"student cut from the teacher: {len(layers)} of {n_total} layers {layers}")
    return student, layers, f"{display_name(cfg.teacher.model or 'teacher')} [layers {_ranges(layers)}]"


def load_models(cfg: Config, train_rows: list[Example], output_dir: Path, say: Callable[[str], None] = log.info) -> Models:
    """Teacher, student (loaded or cut from the teacher) and the shared vocabulary size.

    The teacher is the first configured teacher with a ``model``; when every teacher is an offline
    cache, no teacher model is loaded (``Models.teacher`` is None, see :mod:`kdistill.teachers.build`).
    """
    from kdistill.teachers.build import load_student_only, primary_teacher

    tc = primary_teacher(cfg)
    if tc is None:
        return load_student_only(cfg, say)
    if cfg.student is None:
        raise ConfigError("student: required key is missing (student.model, or student.init to cut one from the teacher)")
    t0 = time.time()
    teacher, tok = load_model(tc.model, "teacher.model", tc.dtype, tc.revision, tc.trust_remote_code)
    say(f"teacher {tc.model}: {count_params(teacher):,} parameters, {num_layers_safe(teacher)} layers ({time.time() - t0:.1f} s)")
    layers = None
    if cfg.student.model is not None:
        student, s_tok = load_model(
            cfg.student.model, "student.model", cfg.student.dtype, cfg.student.revision, cfg.student.trust_remote_code
        )
        student_name = cfg.student.model
    else:
        student, layers, student_name = cut_from_teacher(cfg, teacher, tok, train_rows, output_dir, say)
        s_tok = tok
    vocab = check_vocab(tok, s_tok, teacher, student)
    if cfg.student.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    return Models(teacher, student, tok, vocab, display_name(tc.model), student_name, layers)


def display_name(spec: str) -> str:
    """How a model spec is named in reports ("demo" is the bundled SmolLM2 GGUF)."""
    return "HuggingFaceTB/SmolLM2-135M-Instruct (bundled Q4_1 GGUF)" if spec == "demo" else spec


def num_layers_safe(model) -> str:
    try:
        return str(num_layers(model))
    except Exception:  # noqa: BLE001
        return "?"


def _ranges(idx: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i == len(idx) - 1 or idx[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def _importance(teacher, tok, cfg: Config, rows: list[Example]) -> list[float]:
    renderer = _renderer(cfg, tok)
    feats = [renderer.encode(r) for r in rows]
    batches = [collate(feats[i : i + 8], tok.pad_token_id) for i in range(0, len(feats), 8)]
    return layer_importance(teacher, batches)


def model_metrics(model, m: Models, cfg: Config, renderer: Renderer, eval_rows, eval_feats, with_teacher: bool, device) -> dict:
    """Held-out logit metrics and task accuracy of one model (outputs kept for samples); per task
    too when the rows come from several ``data.tasks``."""

    def measure(rows, feats) -> dict:
        metrics = logit_metrics(
            model, feats, m.tokenizer.pad_token_id, m.vocab_size,
            teacher=m.teacher if with_teacher else None, batch_size=cfg.eval.batch_size, device=device,
        )
        if not with_teacher:  # the teacher against itself
            metrics["kl_to_teacher"] = 0.0
            metrics["top1_agreement"] = 1.0
        outputs: list[str] = []
        if cfg.eval.generate and not with_teacher and cfg.eval.teacher_answers == "data":
            acc, outputs = scored_answers(rows, cfg.eval.match)  # the teacher's own answers are in the data
        elif cfg.eval.generate:
            acc, outputs = task_accuracy(model, m.tokenizer, renderer, rows, cfg.eval.max_new_tokens,
                                         cfg.eval.batch_size, cfg.eval.match)
        else:
            acc = None
        if acc is not None:
            metrics["accuracy"] = acc
        return {"metrics": {k: round(v, 6) for k, v in metrics.items()}, "outputs": outputs}

    return by_task(eval_rows, eval_feats, measure)


TEACHER_EVAL_FILE = "teacher_eval.json"  # in a teacher cache folder: the teacher's held-out figures


def eval_fingerprint(cfg: Config, eval_rows: list[Example]) -> str:
    """What a model's held-out figures depend on: the rows, how they are rendered, the eval settings."""
    import hashlib

    key = {
        "rows": [[e.id, e.messages, e.response, e.reference] for e in eval_rows],
        "data": [cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template],
        "eval": [cfg.eval.generate, cfg.eval.max_new_tokens, cfg.eval.match],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_teacher_eval(cfg: Config, eval_rows: list[Example], say: Callable[[str], None] = log.info) -> dict:
    """The teacher's held-out figures when the teacher is only an offline cache.

    ``kdistill cache-teacher`` evaluates the teacher on ``data.eval`` while it has it loaded and
    stores the result in the cache folder; it is used when it was made for these very rows and
    settings (:func:`eval_fingerprint`). Otherwise there are no teacher figures (and no retention).
    """
    from kdistill.teachers.build import teacher_configs

    want = eval_fingerprint(cfg, eval_rows)
    for t in teacher_configs(cfg):
        if not t.cache:
            continue
        path = Path(t.cache) / TEACHER_EVAL_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == want:
                say(f"teacher figures: from {path} (measured by cache-teacher on these held-out rows)")
                return {"metrics": saved["metrics"], "outputs": saved.get("outputs", []), "params": saved.get("params")}
    say("teacher figures: none (the teacher is only a cache, and no cache holds figures for these held-out rows and "
        "eval settings: run `kdistill cache-teacher` with this data.eval / eval: section to get retention)")
    return {"metrics": {}, "outputs": []}


class BestKeeper:
    """``eval.every``: ``measure(student) -> metrics`` on the held-out rows every N steps; with
    ``eval.select_best``, the best student so far is saved in ``OUTPUT/best/`` (and ``best.json``;
    a resumed run keeps it). Shared by every single-pass method (the trainer's ``evaluator``)."""

    def __init__(self, cfg: Config, measure: Callable[[Any], dict], out: Path, say: Callable[[str], None]):
        from kdistill.feedback import on_main
        from kdistill.trainer import _latest_checkpoint

        self.measure, self.out, self.say = measure, Path(out), say
        self.metric = cfg.eval.select_best
        if _latest_checkpoint(self.out / "checkpoints") is None:  # a fresh run: forget a previous run's best
            on_main(lambda: (self.out / "best.json").unlink(missing_ok=True))

    def best(self) -> Optional[dict]:
        p = self.out / "best.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def __call__(self, step: int, wrapper) -> dict:
        from kdistill.evaluate import HIGHER_IS_BETTER
        from kdistill.feedback import on_main, save_model

        student = getattr(wrapper, "model", wrapper)
        metrics = self.measure(student)
        value = metrics.get(self.metric) if self.metric else None
        if value is None:
            return metrics
        best = self.best()
        higher = HIGHER_IS_BETTER.get(self.metric, True)
        if best is None or (value > best["value"] if higher else value < best["value"]):
            save_model(student, self.out / "best")
            record = {"step": step, "metric": self.metric, "value": value}
            on_main(lambda: (self.out / "best.json").write_text(json.dumps(record)))
        return metrics

    def select(self, student, training: dict):
        """After training: the best student (``eval.select_best``) instead of the last one, recorded in
        ``training["selected"]``; the last student when there is no selection."""
        best = self.best() if self.metric else None
        if best is None:
            return student
        from kdistill.feedback import load_saved

        self.say(f"selected the student of step {best['step']} ({best['metric']} {best['value']}), not the last one "
                 "(eval.select_best)")
        training["selected"] = best
        return load_saved(student, self.out / "best")


def api_teacher_eval(cfg: Config, rows: list[Example], out: Path, feats: Optional[list[dict]] = None,
                     served=None, pad_id: int = 0) -> dict:
    """An API teacher's held-out figures: accuracy from its greedy answers (cached in
    ``eval_teacher_answers.jsonl``: a rerun asks only for what is missing) and, for a teacher that
    gives log-probs (``served``, an :class:`~kdistill.teachers.api_logprobs.ApiLogprobTeacher`), the
    perplexity of ``feats``' response tokens.

    Returns ``{"metrics", "outputs", "answered", "tasks"?}`` like :func:`kdistill.evaluate.by_task`:
    ``outputs`` follow the rows with a reference, ``tasks`` (two or more ``data.tasks``) holds each
    task's figures; rows the API did not answer are left out of the accuracy and counted in ``answered``.
    Raises :class:`~kdistill.teachers.api.ApiError` when the API cannot be used at all.
    """
    from kdistill.evaluate import matches
    from kdistill.teachers.api import ApiTeacher, Job

    with_ref = [e for e in rows if e.reference is not None]
    have: dict[str, str] = {}
    if with_ref and cfg.eval.generate:
        path = out / "eval_teacher_answers.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    have[r["id"]] = r["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: asked again
        todo = [e for e in with_ref if e.id not in have]
        if todo:
            api = ApiTeacher(cfg.teacher.api)
            system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
            jobs = [Job(e.id, system + e.messages, 0.0, cfg.eval.max_new_tokens) for e in todo]
            with path.open("a", encoding="utf-8") as fh:
                def keep(job, c):
                    if c.ok:
                        have[job.key] = c.text
                        fh.write(json.dumps({"id": job.key, "answer": c.text}) + "\n")
                        fh.flush()
                api.run(jobs, keep)

    def measure(sub: list[Example], sub_feats: list[dict]) -> dict:
        metrics: dict = {}
        ref = [e for e in sub if e.reference is not None]
        answered = [e for e in ref if e.id in have]
        if answered:
            metrics["accuracy"] = sum(matches(have[e.id], e.reference, cfg.eval.match) for e in answered) / len(answered)
        if served is not None and sub_feats:
            ppl = served.perplexity(sub_feats, pad_id, cfg.eval.batch_size)
            if ppl is not None:
                metrics["perplexity"] = ppl
        return {"metrics": {k: round(v, 6) for k, v in metrics.items()}, "outputs": [have.get(e.id, "") for e in ref]}

    ev = by_task(rows, feats if served is not None and feats else [], measure)
    ev["answered"] = sum(e.id in have for e in with_ref)
    return ev


def teacher_eval_without_model(cfg: Config, eval_rows: list[Example], out: Path, acc, teacher,
                               say: Callable[[str], None], eval_feats: Optional[list[dict]] = None,
                               pad_id: int = 0, keep: Optional[Path] = None) -> dict:
    """The teacher's held-out figures when no teacher model is loaded: an API teacher's from its
    answers and log-probs (:func:`api_teacher_eval`), or what ``cache-teacher`` stored.

    ``keep``: a file for a served teacher's figures, so that a resumed run does not pay for its
    held-out log-probs again (its answers are kept per row in any case).
    """
    from kdistill.teachers.api import ApiTextTeacher
    from kdistill.teachers.api_logprobs import ApiLogprobTeacher

    if isinstance(teacher, (ApiTextTeacher, ApiLogprobTeacher)):
        served = teacher if isinstance(teacher, ApiLogprobTeacher) else None
        ask = lambda: api_teacher_eval(cfg, eval_rows, out, eval_feats, served, pad_id)  # noqa: E731
        with acc.main_process_first():  # asked once; the other processes find it on disk
            return _cached(keep, ask) if served is not None and keep is not None else ask()
    return cached_teacher_eval(cfg, eval_rows, say)


def unavailable_without_model(m: Models, teacher_ev: dict, teacher) -> dict:
    """``{metric: why}``: what cannot be measured when no teacher model is loaded."""
    from kdistill.teachers.api import ApiTextTeacher
    from kdistill.teachers.api_logprobs import ApiLogprobTeacher

    if isinstance(teacher, ApiTextTeacher):
        why = "the teacher is an API (text only: no token probabilities)"
        return {"perplexity": why, "kl_to_teacher": why, "top1_agreement": why}
    if isinstance(teacher, ApiLogprobTeacher):
        why = "the teacher is served over HTTP (its top-k log-probs train the student; these need its full distribution)"
        return {"kl_to_teacher": why, "top1_agreement": why}
    if m.teacher is None:
        why = "trained from an offline teacher cache without teacher.model"
        out = {"kl_to_teacher": why, "top1_agreement": why}
        if not teacher_ev["metrics"]:
            why += " (and the cache holds no teacher figures for these held-out rows)"
            out.update({"teacher metrics": why, "retention": why})
        return out
    return {}


def who(m: Models, teacher_ev: dict, teacher) -> tuple[dict, dict]:
    """The report's ``teacher`` and ``student`` descriptions (without metrics)."""
    from kdistill.teachers.api import ApiTextTeacher
    from kdistill.teachers.api_logprobs import ApiLogprobTeacher

    params = (count_params(m.teacher) if m.teacher is not None
              else (m.extra.get("teacher_params") or teacher_ev.get("params")))
    kind = ("local" if m.teacher is not None else "api" if isinstance(teacher, (ApiTextTeacher, ApiLogprobTeacher))
            else "cache")
    return ({"name": m.teacher_name, "params": params, "kind": kind},
            {"name": m.student_name, "params": count_params(m.student), "teacher_layers": m.teacher_layers})


def _cached(path: Path, fn: Callable[[], dict]) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.write_text(json.dumps(value))
    return value


def _speed(m: Models, renderer: Renderer, eval_rows: list[Example], cfg: Config, device) -> dict:
    n = cfg.eval.speed_prompts
    if n == 0 or not eval_rows:
        return {}
    prompts = [renderer.prompt_ids(e) for e in eval_rows[:n]]
    return {
        **({"teacher": measure_speed(m.teacher, m.tokenizer, prompts, cfg.eval.speed_new_tokens, device)}
           if m.teacher is not None else {}),
        "student": measure_speed(m.student, m.tokenizer, prompts, cfg.eval.speed_new_tokens, device),
    }


def start_run(cfg: Config, out: Path):
    """Create ``out``, write the resolved ``config.yaml``, set threads; returns the Accelerator."""
    from accelerate import Accelerator

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    check_launch(acc.num_processes)
    return acc


def check_launch(num_processes: int) -> None:
    """Refuse N copies of one run: a launcher started several processes but accelerate sees one
    (on CPUs accelerate only goes multi-process when asked: ``accelerate launch --cpu``)."""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and num_processes == 1:
        raise ConfigError(f"launched as {launched} processes (WORLD_SIZE), but accelerate runs each as a separate "
                          "single-process run; without GPUs use `accelerate launch --cpu` or set ACCELERATE_USE_CPU=true")


def run(cfg: Config, say: Callable[[str], None] = log.info, progress: bool = True) -> dict:
    """``kdistill run``: train a student and write everything into ``cfg.output_dir``."""
    if cfg.method == "sequence":  # text-only teacher signal: API, other tokenizer, or none (issue 4)
        from kdistill.sequence_pipeline import run_sequence

        return run_sequence(cfg, say, progress)

    from kdistill.methods import RunContext, build_method
    from kdistill.methods.base import StudentLM
    from kdistill.trainer import train

    out = Path(cfg.output_dir)
    check_paths(cfg)
    from kdistill.methods import needs_responses

    prompts_only = not needs_responses(cfg.method)  # e.g. zephyr: the teacher and student write the answers
    mixture: dict = {}
    train_rows, eval_rows = load_data(cfg, require_response=not prompts_only, mixture=mixture)
    acc = start_run(cfg, out)
    device = acc.device
    m = load_models(cfg, train_rows, out, say)
    if m.teacher is not None:
        m.teacher.to(device)
    m.student.to(device)
    renderer = _renderer(cfg, m.tokenizer)
    feats, n_empty = encode_examples(renderer, train_rows)
    truncated = renderer.truncated
    eval_renderer = _renderer(cfg, m.tokenizer)
    eval_feats, _ = encode_examples(eval_renderer, eval_rows)
    if truncated or (n_empty and not prompts_only):
        say(f"data: {truncated} of {len(train_rows)} training rows truncated to data.max_length={cfg.data.max_length}"
            + (f"; {n_empty} had no response tokens left and are skipped" if n_empty else ""))
    if not feats and not prompts_only:
        raise DataError(f"{cfg.data.train or 'data.tasks'}: no row has response tokens within "
                        f"data.max_length={cfg.data.max_length}")

    from kdistill.teachers.build import build_teacher, reload_teacher, uses_model

    teacher = build_teacher(cfg, m, feats, device, say)  # a local model, an offline cache, or several
    ctx = RunContext(cfg=cfg, tokenizer=m.tokenizer, teacher=teacher, vocab_size=m.vocab_size, output_dir=out,
                     device=device, renderer=renderer, train_examples=train_rows, student=m.student)
    try:
        method = build_method(cfg.method, ctx)
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    feats = method.train_features() or feats

    if acc.is_main_process:
        say(f"evaluating the teacher and the initial student on {len(eval_rows)} held-out rows")
    if m.teacher is None:  # an API teacher, or a cache
        teacher_ev = teacher_eval_without_model(cfg, eval_rows, out, acc, teacher,
                                                say if acc.is_main_process else (lambda _: None), eval_feats,
                                                m.tokenizer.pad_token_id, keep=out / "eval_teacher.json")
    else:
        teacher_ev = _cached(out / "eval_teacher.json",
                             lambda: model_metrics(m.teacher, m, cfg, eval_renderer, eval_rows, eval_feats, False, device))
    initial_ev = _cached(out / "eval_student_initial.json",
                         lambda: model_metrics(m.student, m, cfg, eval_renderer, eval_rows, eval_feats, True, device))
    freed_teacher = m.teacher is not None and not uses_model(teacher, m.teacher)
    if freed_teacher:  # the signal comes from a cache: train without the teacher model in memory
        import gc

        m.extra["teacher_params"] = count_params(m.teacher)
        m.teacher = None
        gc.collect()
        say("teacher model freed for training (signal from the cache); it is reloaded for the final evaluation")

    loss_desc = (f", {cfg.loss.divergence}, T={cfg.loss.temperature}, alpha={cfg.loss.alpha}"
                 if cfg.method in ("logit", "on_policy", "progressive") else "")
    say(f"training ({cfg.method}{loss_desc}) on {len(feats)} rows")
    from kdistill.stages import StageRunner

    main = acc.is_main_process  # several processes: one speaks
    runner = StageRunner(cfg, m.tokenizer, m.teacher, m.vocab_size, device, eval_rows, eval_feats, progress and main,
                         say if main else (lambda _: None))
    staged = method.fit(m.student, runner)  # multi-pass methods (rounds, stages); None = one trainer pass
    if staged is not None:
        student, training = staged
        training = {**training, "truncated_rows": truncated}
        m.teacher_layers = getattr(student.config, "kdistill_teacher_layers", m.teacher_layers)  # e.g. cut again
    else:
        wrapper = StudentLM(m.student, method.trainable_modules())
        curriculum = None
        if cfg.curriculum.by != "none":
            from kdistill.curriculum import difficulty

            from kdistill.teachers.local import LocalTeacher

            live = teacher.model if isinstance(teacher, LocalTeacher) else None
            scores = difficulty(cfg.curriculum, feats, out, live, m.tokenizer.pad_token_id, m.vocab_size,
                                cfg.eval.batch_size)
            curriculum = (cfg.curriculum, scores)
        evaluator = None
        if cfg.eval.every:
            keeper = BestKeeper(cfg, lambda s: model_metrics(s, m, cfg, eval_renderer, eval_rows, eval_feats, True,
                                                             device)["metrics"], out, say)
            evaluator = (cfg.eval.every, keeper)
        result = train(wrapper, method, feats, lambda b: collate(b, m.tokenizer.pad_token_id), cfg.train, out,
                       accelerator=acc, progress=progress, curriculum=curriculum, evaluator=evaluator)
        student = acc.unwrap_model(wrapper).model
        if result.resumed_from is not None:
            say(f"resumed from the checkpoint at step {result.resumed_from} of {result.steps}"
                + (" (training was already complete)" if result.resumed_from == result.steps else ""))
        training = {
            "steps": result.steps, "seconds": round(result.seconds, 1), "train_rows": len(feats),
            "items": result.tokens, "resumed_from": result.resumed_from, "stopped_early": result.stopped_early,
            "truncated_rows": truncated,
        }
        if curriculum is not None:
            from kdistill.curriculum import describe

            training["curriculum"] = describe(cfg.curriculum, curriculum[1], result.steps)
        if evaluator is not None:
            student = evaluator[1].select(student, training)
    m.student = student
    if freed_teacher:
        m.teacher = reload_teacher(cfg, device)

    final_ev = model_metrics(student, m, cfg, eval_renderer, eval_rows, eval_feats, True, device)
    speed = _speed(m, eval_renderer, eval_rows, cfg, device) if acc.is_main_process else {}
    rep = build_report(cfg.method, *who(m, teacher_ev, teacher), teacher_ev, initial_ev, final_ev, eval_rows,
                       cfg.eval.show_samples, speed, training, method.summary(),
                       unavailable_without_model(m, teacher_ev, teacher))
    if mixture:
        rep["data_mixture"] = mixture
    if acc.is_main_process:
        sdir = out / "student"
        student.save_pretrained(str(sdir))
        m.tokenizer.save_pretrained(str(sdir))
        (sdir / "README.md").write_text(model_card(rep, dump_config(cfg)))
        write_report(rep, out)
    return rep


def evaluate_only(cfg: Config, say: Callable[[str], None] = log.info) -> dict:
    """``kdistill eval``: the same report for existing teacher and student, without training."""
    if cfg.method == "sequence":
        from kdistill.sequence_pipeline import run_sequence

        return run_sequence(cfg, say, progress=False, train=False)
    out = Path(cfg.output_dir)
    check_paths(cfg, need_train=False)
    train_rows, eval_rows = load_data(cfg, require_train=False)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = load_models(cfg, train_rows, out, say)
    m.student.to(device)
    renderer = _renderer(cfg, m.tokenizer)
    eval_feats, _ = encode_examples(renderer, eval_rows)
    say(f"evaluating {'teacher and ' if m.teacher is not None else ''}student on {len(eval_rows)} held-out rows")
    teacher = None
    if m.teacher is None:  # the teacher is only an API or a cache
        from accelerate import PartialState

        from kdistill.teachers.build import http_teacher

        teacher = http_teacher(cfg, m.vocab_size)
        if hasattr(teacher, "check_tokenizer"):  # a served teacher's log-probs mean nothing under another tokenizer
            say(f"teacher: {teacher.name}; {teacher.check_tokenizer(m.tokenizer)}")
        teacher_ev = teacher_eval_without_model(cfg, eval_rows, out, PartialState(), teacher, say, eval_feats,
                                                m.tokenizer.pad_token_id)
    else:
        m.teacher.to(device)
        teacher_ev = model_metrics(m.teacher, m, cfg, renderer, eval_rows, eval_feats, False, device)
    student_ev = model_metrics(m.student, m, cfg, renderer, eval_rows, eval_feats, True, device)
    speed = _speed(m, renderer, eval_rows, cfg, device)
    rep = build_report(cfg.method, *who(m, teacher_ev, teacher), teacher_ev, None, student_ev, eval_rows,
                       cfg.eval.show_samples, speed, unavailable=unavailable_without_model(m, teacher_ev, teacher))
    write_report(rep, out)
    return rep
