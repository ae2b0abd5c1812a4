"""``kdistill run`` / ``kdistill eval`` for ``method: sequence`` (sequence-level / black-box KD).

Sequence-level KD needs only the teacher's *text*, so this path differs from the logit pipeline
where the teacher is concerned (it may be an API, a local model with another tokenizer, or
absent) and shares everything else (data rows, rendering/masking, the method registry, the
trainer, checkpoints, the report):

1. teacher text: with a ``generate:`` section, the teacher (``teacher.api``, else the local
   ``teacher.model``) answers the prompts first (``kdistill.generate``: resumable, append-only);
   otherwise ``data.train`` already holds teacher-written rows (e.g. from ``kdistill generate``);
2. held-out rows: ``data.eval``, else a deterministic split of the teacher-written rows;
3. filters (``filters:``) on the training rows, each counted in the report;
4. the student: ``student.model`` (any tokenizer; ``check_vocab`` is not called) or cut from a
   local ``teacher.model`` (``student.init``);
5. the trainer with :class:`~kdistill.methods.sequence.SequenceMethod`;
6. the retention report with what can be measured: every metric of the teacher that cannot be
   (perplexity or KL of an API teacher, KL across tokenizers, ...) is listed under
   ``unavailable`` with the reason, instead of failing the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional


from kdistill.config import Config, check_paths, dump_config
from kdistill.data import Example, collate, encode_examples
from kdistill.errors import ConfigError, DataError
from kdistill.evaluate import by_task, logit_metrics, measure_speed, task_accuracy
from kdistill.pipeline import _cached, _renderer, api_teacher_eval, cut_from_teacher, load_data, start_run
from kdistill.report import build_report, write_report
from kdistill.models import (
    count_params,
    load_model,
    output_vocab_size,
    tokenizer_fingerprint,
)

log = logging.getLogger("kdistill")


def _load_teacher(cfg: Config, say) -> Optional[tuple]:
    if cfg.teacher.model is None:
        return None
    t0 = time.time()
    model, tok = load_model(cfg.teacher.model, "teacher.model", cfg.teacher.dtype, cfg.teacher.revision,
                            cfg.teacher.trust_remote_code)
    say(f"teacher {cfg.teacher.model}: {count_params(model):,} parameters ({time.time() - t0:.1f} s)")
    return model, tok


def _load_student(cfg: Config, local: Optional[tuple], train_rows: list[Example], out: Path, say):
    """``(student, tokenizer, name, kept_layers)``."""
    sc = cfg.student
    if sc.model is not None:
        model, tok = load_model(sc.model, "student.model", sc.dtype, sc.revision, sc.trust_remote_code)
        return model, tok, sc.model, None
    if local is None:
        raise ConfigError("student.init: cutting a student needs a local teacher.model; with an API-only teacher "
                          "give student.model")
    teacher, tok = local
    student, layers, name = cut_from_teacher(cfg, teacher, tok, train_rows, out, say)
    return student, tok, name, layers


def _metrics(model, tok, cfg, rows, feats, teacher=None, vocab=None, device=None, gen_rows=None) -> dict:
    vocab = vocab or min(output_vocab_size(model), len(tok))
    m = logit_metrics(model, feats, tok.pad_token_id, vocab, teacher=teacher, batch_size=cfg.eval.batch_size,
                      device=device)
    outputs: list[str] = []
    if cfg.eval.generate:
        acc, outputs = task_accuracy(model, tok, _renderer(cfg, tok), gen_rows if gen_rows is not None else rows,
                                     cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.match)
        if acc is not None:
            m["accuracy"] = acc
    return {"metrics": {k: round(v, 6) for k, v in m.items()}, "outputs": outputs}


def run_sequence(cfg: Config, say: Callable[[str], None] = log.info, progress: bool = True, train: bool = True) -> dict:
    """Sequence-level KD end to end (``train=False``: ``kdistill eval``, the report only)."""

    from kdistill.filters import apply_filters, make_judge
    from kdistill.methods import RunContext, build_method
    from kdistill.methods.base import StudentLM
    from kdistill.methods.sequence import with_prefix
    from kdistill.report import model_card
    from kdistill.teachers.api import ApiError

    out = Path(cfg.output_dir)
    if cfg.student is None:
        raise ConfigError("student: required key is missing (student.model, or student.init to cut one from a local teacher)")
    if cfg.student.init is not None and cfg.teacher.model is None:
        raise ConfigError("student.init: cutting a student needs a local teacher.model; with an API-only teacher "
                          "give student.model")
    if cfg.generate is not None and cfg.data.tasks is not None:
        raise ConfigError("data.tasks: a generate: section writes one file; run `kdistill generate` per task and "
                          "list the answer files in data.tasks")
    if cfg.generate is not None and cfg.teacher.api is None and cfg.teacher.model is None:
        raise ConfigError("teacher: a generate: section needs teacher.api or teacher.model to write the answers")
    check_paths(cfg, need_train=False)
    acc = start_run(cfg, out)
    device = acc.device
    local = _load_teacher(cfg, say)

    # 1. teacher text
    gen_summary = None
    train_path = cfg.data.train
    if cfg.generate is not None and train:
        from kdistill.generate import generate

        with acc.main_process_first():  # one process pays; the others then find every row answered
            gen_summary = generate(cfg, say, progress and acc.is_main_process,
                                   local=local if cfg.teacher.api is None else None)
        train_path = gen_summary["output"]
    mixture: dict = {}
    train_rows, eval_rows = load_data(cfg, require_train=train, train_path=train_path, mixture=mixture)

    # 2. filters
    filter_report = None
    if train:
        judge = make_judge(cfg, local) if cfg.filters.judge is not None else None
        n0 = len(train_rows)
        with acc.main_process_first():  # judge scores are cached: asked once
            train_rows, filter_report = apply_filters(train_rows, cfg.filters, judge, out / "judge_scores.jsonl", say)
        dropped = {k: v for k, v in filter_report["dropped"].items() if v}
        say(f"filters: kept {len(train_rows)} of {n0} teacher-written rows"
            + (f" (dropped {', '.join(f'{k} {v}' for k, v in dropped.items())})" if dropped else ""))
        if not train_rows:
            raise DataError(f"filters: no training row is left (dropped: {filter_report['dropped']})")

    # 3. student
    student, s_tok, student_name, layers = _load_student(cfg, local, train_rows, out, say)
    if cfg.student.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    student.to(device)
    t_model, t_tok = local if local is not None else (None, None)
    same_vocab = t_tok is not None and tokenizer_fingerprint(t_tok) == tokenizer_fingerprint(s_tok)
    if t_model is not None:
        t_model.to(device)
    renderer = _renderer(cfg, s_tok)
    ctx = RunContext(cfg=cfg, tokenizer=s_tok, teacher=None, vocab_size=min(output_vocab_size(student), len(s_tok)),
                     output_dir=out, device=device, renderer=renderer, train_examples=train_rows)
    method = build_method("sequence", ctx)
    feats = method.train_features() if train else []
    if train and renderer.truncated:
        say(f"data: {renderer.truncated} training views truncated to data.max_length={cfg.data.max_length}")

    # 4. held-out evaluation: what can be measured
    eval_feats, _ = encode_examples(_renderer(cfg, s_tok), eval_rows)
    s_gen_rows = eval_rows
    if getattr(method, "multitask", False):
        s_gen_rows = [with_prefix(e, cfg.sequence.answer_prefix, e.response) for e in eval_rows]
    vocab = min(output_vocab_size(student), output_vocab_size(t_model), len(s_tok)) if same_vocab else None
    unavailable: dict[str, str] = {}
    say(f"evaluating on {len(eval_rows)} held-out rows")
    if t_model is not None:
        if same_vocab:
            t_ev = _cached(out / "eval_teacher.json", lambda: by_task(eval_rows, eval_feats, lambda r, f: _metrics(
                t_model, t_tok, cfg, r, f, vocab=vocab, device=device)))
            for m_ in [t_ev["metrics"], *(t_ev.get("tasks") or {}).values()]:
                m_.update(kl_to_teacher=0.0, top1_agreement=1.0)
        else:
            t_feats, _ = encode_examples(_renderer(cfg, t_tok), eval_rows)
            t_ev = _cached(out / "eval_teacher.json", lambda: by_task(eval_rows, t_feats, lambda r, f: _metrics(
                t_model, t_tok, cfg, r, f, device=device)))
            unavailable["kl_to_teacher"] = unavailable["top1_agreement"] = \
                "teacher and student tokenizers differ (no token-level comparison)"
            unavailable["perplexity"] = "per-token perplexities under different tokenizers are not comparable " \
                "(each model's own perplexity is still reported)"
    elif cfg.teacher.api is not None:
        try:
            with acc.main_process_first():  # answers are cached: asked once
                t_ev = api_teacher_eval(cfg, eval_rows, out)
        except ApiError as exc:
            say(f"the API teacher could not be evaluated: {exc}")
            t_ev = {"metrics": {}, "outputs": []}
            unavailable["accuracy"] = f"the API teacher could not be evaluated ({exc})"
        if "accuracy" not in t_ev["metrics"] and "accuracy" not in unavailable:
            unavailable["accuracy"] = "no held-out row has a 'reference' (or eval.generate is off)"
        for k in ("perplexity", "kl_to_teacher", "top1_agreement"):
            unavailable[k] = "the teacher is an API (text only: no token probabilities)"
    else:
        t_ev = {"metrics": {}, "outputs": []}
        for k in ("accuracy", "perplexity", "kl_to_teacher", "top1_agreement"):
            unavailable[k] = "no teacher is available at train time (teacher-written data only)"
    cmp_teacher = t_model if same_vocab else None

    def student_eval(model):  # per task too with data.tasks (ids and task tags survive the prefix)
        return by_task(s_gen_rows, eval_feats, lambda r, f: _metrics(model, s_tok, cfg, r, f, teacher=cmp_teacher,
                                                                     vocab=vocab, device=device, gen_rows=r))

    initial_ev = None
    training = None
    keeper = None
    if train and cfg.eval.every:
        from kdistill.pipeline import BestKeeper

        keeper = BestKeeper(cfg, lambda model: student_eval(model)["metrics"], out, say)
    if train:
        initial_ev = _cached(out / "eval_student_initial.json", lambda: student_eval(student))
        from kdistill.trainer import train as train_loop

        say(f"training (sequence-level KD, cross-entropy on teacher text) on {len(feats)} views of {len(train_rows)} rows")
        wrapper = StudentLM(student)
        curriculum = None
        if cfg.curriculum.by != "none":
            from kdistill.curriculum import difficulty

            scores = difficulty(cfg.curriculum, feats, out, t_model if same_vocab else None, s_tok.pad_token_id,
                                vocab or len(s_tok), cfg.eval.batch_size)
            curriculum = (cfg.curriculum, scores)
        result = train_loop(wrapper, method, feats, lambda b: collate(b, s_tok.pad_token_id), cfg.train, out,
                            accelerator=acc, progress=progress, curriculum=curriculum,
                            evaluator=(cfg.eval.every, keeper) if keeper is not None else None)
        student = acc.unwrap_model(wrapper).model
        training = {"steps": result.steps, "seconds": round(result.seconds, 1), "train_rows": len(feats),
                    "items": result.tokens, "resumed_from": result.resumed_from, "stopped_early": result.stopped_early,
                    "truncated_rows": renderer.truncated}
        if curriculum is not None:
            from kdistill.curriculum import describe

            training["curriculum"] = describe(cfg.curriculum, curriculum[1], result.steps)
        if keeper is not None:
            student = keeper.select(student, training)
    final_ev = student_eval(student)

    # 5. report
    speed: dict = {}
    if cfg.eval.speed_prompts and eval_rows and acc.is_main_process:
        r = _renderer(cfg, s_tok)
        speed["student"] = measure_speed(student, s_tok, [r.prompt_ids(e) for e in eval_rows[: cfg.eval.speed_prompts]],
                                         cfg.eval.speed_new_tokens, device)
        if t_model is not None:
            rt = _renderer(cfg, t_tok)
            speed["teacher"] = measure_speed(t_model, t_tok, [rt.prompt_ids(e) for e in eval_rows[: cfg.eval.speed_prompts]],
                                             cfg.eval.speed_new_tokens, device)
    teacher_display = cfg.teacher.model or (f"api:{cfg.teacher.api.model} @ {cfg.teacher.api.base_url}"
                                            if cfg.teacher.api else "(teacher-written data)")
    teacher = {"name": teacher_display, "params": count_params(t_model) if t_model is not None else None,
               "kind": "local" if t_model is not None else ("api" if cfg.teacher.api else "none")}
    student_desc = {"name": student_name, "params": count_params(student), "teacher_layers": layers}
    summary = method.summary() if train else {}
    if filter_report is not None:
        summary["filters"] = filter_report
    if gen_summary is not None:
        summary["generation"] = {k: v for k, v in gen_summary.items() if k != "teacher"}
    rep = build_report("sequence", teacher, student_desc, t_ev, initial_ev, final_ev, eval_rows, cfg.eval.show_samples,
                       speed, training, summary, unavailable)
    if filter_report is not None:
        rep["filters"] = filter_report
    if gen_summary is not None:
        rep["generation"] = gen_summary
    if mixture:
        rep["data_mixture"] = mixture
    if acc.is_main_process:
        if train:
            sdir = out / "student"
            student.save_pretrained(str(sdir))
            s_tok.save_pretrained(str(sdir))
            (sdir / "README.md").write_text(model_card(rep, dump_config(cfg)))
        write_report(rep, out)
    return rep

