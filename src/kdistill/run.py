"""The one run every method shares, as named phases (read :func:`run` top to bottom).

    setup  ->  teacher weights  ->  training rows  ->  student  ->  teacher  ->  method
           ->  baseline figures  ->  fit  ->  final figures  ->  report and save

What differs between methods is asked of the method's class (what it needs of the teacher, whether
it writes its own rows, whether teacher and student must share a vocabulary, one trainer pass or
its own stages); what differs between teachers is asked of the teacher (what it offers, how it
reports on itself). ``kdistill run`` is :func:`run`; ``kdistill eval`` is :func:`evaluate`, the
same phases without ``fit``. Every user mistake raises a
:class:`~kdistill.errors.KDistillError` before any training starts.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator

from kdistill import trackers
from kdistill.batching import make_collate, packing_refusal
from kdistill.config import check_paths, dump_config
from kdistill.console import quiet
from kdistill.curriculum import describe, difficulty
from kdistill.data import Example, Renderer, encode_examples
from kdistill.splits import read_rows
from kdistill.errors import ConfigError, DataError
from kdistill.evaluate import BestKeeper, eval_fingerprint, heldout_figures, measure_speed
from kdistill.methods import build_method, method_class, method_names
from kdistill.methods.base import RunContext
from kdistill.models import StudentLM, check_vocab, count_params, output_vocab_size, param_counts, tokenizer_fingerprint
from kdistill.report import build_report, model_card, write_report
from kdistill.sharding import describe as describe_sharding
from kdistill.sharding import prepare_teacher, shards_models, whole_student
from kdistill.stages import StageRunner
from kdistill.runfolder import LEGACY, LOCK
from kdistill.runfolder import prepare as prepare_run_folder
from kdistill.store import check_own_folder, claim_folder, exclusive, memo_json
from kdistill.students import build_student, display_name, save_student, student_facts
from kdistill.teachers import BuildEnv, HeldOut, build_teacher, load_teacher_weights, primary_teacher, teacher_configs
from kdistill.teachers.build import uses_model
from kdistill.teachers.cross import preflight, teacher_renderer
from kdistill.trainer import InterruptGuard, latest_checkpoint, train
from kdistill.trust import TrustChecks

log = logging.getLogger("kdistill")


def run(cfg, say: Callable[[str], None] = log.info, progress: bool = True) -> dict:
    """``kdistill run``: train a student and write everything into ``cfg.output_dir``."""
    r = Run(cfg, say, progress)
    with r.setup():  # the output folder is this run's while the block runs
        r.load_teacher_weights()
        r.load_rows()
        r.load_student()
        r.build_teacher()
        r.build_method()
        r.baseline()
        r.fit()
        r.final()
        return r.report_and_save()


def evaluate(cfg, say: Callable[[str], None] = log.info) -> dict:
    """``kdistill eval``: the same report for an existing teacher and student, without training."""
    r = Run(cfg, say, progress=False, training=False)
    with r.setup():
        r.load_teacher_weights()
        r.load_rows()
        r.load_student()
        r.build_teacher()
        r.baseline()
        r.final()
        return r.report_and_save()


class Run:
    """The state of one run, filled in phase by phase."""

    def __init__(self, cfg, say: Callable[[str], None] = log.info, progress: bool = True, training: bool = True):
        self.cfg, self.training, self.progress = cfg, training, progress
        self.say_main = say
        self.method_cls = method_class(cfg.method)
        self.out = Path(cfg.output_dir)
        self.extras: dict = {}  # what the method's row phase reports (e.g. generation, filters)
        self.mixture: dict = {}
        self.rows: Optional[tuple] = None
        self.t_weights = None  # the primary teacher's (model, tokenizer), when it has local weights
        self.teacher = None
        self.method = None
        self.freed_teacher_params: Optional[int] = None
        self.training_summary: Optional[dict] = None

    @property
    def say(self) -> Callable[[str], None]:
        """Messages come from the main process only."""
        return self.say_main if getattr(self, "acc", None) is None or self.acc.is_main_process else quiet

    @property
    def t_model(self):
        return self.t_weights[0] if self.t_weights is not None else None

    # -- phase 1: setup ----------------------------------------------------------------------

    def setup(self) -> contextlib.ExitStack:
        """Check files and read the rows (unless the method writes them) before anything is written;
        then the accelerator, and the output folder: checked to be kdistill's, locked for this run, and
        tied to this config (:mod:`kdistill.runfolder`). Returns what releases the lock."""
        cfg = self.cfg
        rows_later = self.method_cls.rows_after_teacher(cfg)
        check_paths(cfg, need_train=self.training and not rows_later)
        if not rows_later:
            self.rows = self.method_cls.training_rows(self)
        check_own_folder(self.out, "output_dir", "run folder", LEGACY)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.acc = (Accelerator(mixed_precision=cfg.train.mixed_precision,
                                **trackers.accelerator_kwargs(cfg.train.report_to, self.out))
                    if self.training else _SingleProcess())
        check_launch(self.acc.num_processes)
        self.device = self.acc.device
        self.trust = TrustChecks(self)
        stack = contextlib.ExitStack()
        if self.acc.is_main_process:
            claim_folder(self.out, "run")
            stack.enter_context(exclusive(self.out / LOCK, f"the run in {self.out}", "output_dir"))
            if self.training:
                self.identity = prepare_run_folder(cfg, self.out, dump_config, self.say)
        self.acc.wait_for_everyone()
        if self.training:
            trackers.start(self.acc, cfg)
        return stack

    def read_rows(self, require_train: Optional[bool] = None, require_response: Optional[bool] = None,
                  train_path: Optional[str] = None) -> tuple[list[Example], list[Example]]:
        """(called by a method's ``training_rows``) ``data:`` -> (training rows, held-out rows).

        Held-out rows are ``data.eval``, or a deterministic split of the training rows. With
        ``data.tasks``: every task's rows (ids ``task/ID``, ``extra["task"]``), held out per task,
        the training rows mixed by the tasks' weights. ``train_path`` replaces ``data.train``.
        """
        rows = read_rows(self.cfg, self.training if require_train is None else require_train,
                         self.method_cls.needs_responses if require_response is None else require_response,
                         train_path, self.say)
        self.mixture = rows.mixture
        return rows.train, rows.held

    # -- phase 2: models ---------------------------------------------------------------------

    def load_teacher_weights(self) -> None:
        """The primary teacher's weights, when a teacher has a ``model`` (to cut, to measure, to run)."""
        self.t_weights = load_teacher_weights(self.cfg, self.say)
        if self.t_model is not None:
            self.t_model.to(self.device)

    def load_rows(self) -> None:
        """The training and held-out rows: read in setup, or written now by the method (e.g. sequence's
        ``generate:``, which needs the teacher)."""
        if self.rows is None:
            self.rows = self.method_cls.training_rows(self)
        self.train_rows, self.eval_rows = self.rows
        self.trust.after_rows()

    def renderer_for(self, tok) -> Renderer:
        return Renderer(tok, self.cfg.data.max_length, self.cfg.data.system_prompt, self.cfg.data.chat_template)

    def load_student(self) -> None:
        """The student (given, or cut from the teacher), the shared vocabulary, the encoded rows."""
        cfg = self.cfg
        self.student, self.tokenizer, self.student_name, self.teacher_layers = build_student(
            cfg, self.t_weights, self.renderer_for, self.train_rows, self.out, self.say, self._teacher_is())
        self.student.to(self.device)
        t_tok = self.t_weights[1] if self.t_weights is not None else None
        self.same_vocab = t_tok is not None and tokenizer_fingerprint(t_tok) == tokenizer_fingerprint(self.tokenizer)
        if self.t_weights is not None and self.method_cls.shares_vocab and not self.same_vocab:
            # another tokenizer: refused in one line without loss.cross_tokenizer, else what differs is shown
            self.vocab_size = preflight(cfg, self.t_model, t_tok, self.student, self.tokenizer, self.say,
                                        primary_teacher(cfg))
        elif self.t_weights is not None and (self.method_cls.shares_vocab or self.same_vocab):
            self.vocab_size = check_vocab(t_tok, self.tokenizer, self.t_model, self.student)
        else:
            self.vocab_size = min(output_vocab_size(self.student), len(self.tokenizer))
        self.renderer = self.renderer_for(self.tokenizer)
        self.feats, n_empty = encode_examples(self.renderer, self.train_rows) if self.training else ([], 0)
        self.truncated = self.renderer.truncated
        self.eval_renderer = self.renderer_for(self.tokenizer)
        self.eval_feats, _ = encode_examples(self.eval_renderer, self.eval_rows)
        needs = self.method_cls.needs_responses
        if self.truncated or (n_empty and needs):
            self.say(f"data: {self.truncated} of {len(self.train_rows)} training rows truncated to data.max_length="
                     f"{cfg.data.max_length}" + (f"; {n_empty} had no response tokens left and are skipped" if n_empty else ""))
        if self.training and not self.feats and needs:
            raise DataError(f"{cfg.data.train or 'data.tasks'}: no row has response tokens within "
                            f"data.max_length={cfg.data.max_length}")

    def _teacher_is(self) -> Optional[str]:
        specs = teacher_configs(self.cfg)
        if any(s.cache is not None for s in specs):
            return "a cache"
        if any(s.api is not None for s in specs):
            return "an API"
        return None

    def build_teacher(self) -> None:
        """The teacher object (from the kind registry), checked against what the method needs."""
        cfg, needs = self.cfg, self.method_cls.teacher_needs(self.cfg)
        if self.training and self.t_model is not None:  # inference only; sharded like the student under FSDP2/ZeRO-3
            self.t_weights = (prepare_teacher(self.t_model, self.acc, primary_teacher(cfg).placement), self.t_weights[1])
        env = BuildEnv(cfg=cfg, tokenizer=self.tokenizer, vocab_size=self.vocab_size, features=self.feats,
                       device=self.device, say=self.say, weights=self.t_weights, student=self.student,
                       primary=primary_teacher(cfg), needs=needs, method=cfg.method, rows=self.train_rows)
        self.teacher = build_teacher(cfg, env) if (self.training or self.t_weights is None) else None
        if self.teacher is None and self.t_weights is None and needs:
            raise ConfigError("teacher.model: required for this method (hub id, folder, .gguf file, or 'demo'), "
                              "or teacher.cache")
        if self.teacher is not None:
            missing = sorted(needs - self.teacher.offers)
            if missing:
                could = [n for n in method_names() if n != cfg.method
                         and method_class(n).teacher_needs(cfg) and method_class(n).teacher_needs(cfg) <= self.teacher.offers]
                raise ConfigError(self.teacher.refuse(missing[0], cfg.method, ", ".join(could)))

    def build_method(self) -> None:
        ctx = RunContext(cfg=self.cfg, tokenizer=self.tokenizer, teacher=self.teacher, vocab_size=self.vocab_size,
                         output_dir=self.out, device=self.device, renderer=self.renderer,
                         train_examples=self.train_rows, student=self.student, extra=self.extras)
        try:
            self.method = build_method(self.cfg.method, ctx)
        except ValueError as exc:
            raise ConfigError(f"method: {exc}") from None
        self.feats = self.method.train_features() or self.feats
        if self.cfg.train.batching == "packed":  # refused before any figure is computed
            why = packing_refusal(self.method, self.teacher, self.student)
            if why:
                raise ConfigError(why)

    # -- phase 3: figures before training ------------------------------------------------------

    def _student_figures(self, model) -> dict:
        rows = self.method.eval_rows(self.eval_rows) if self.method is not None else self.eval_rows
        live = self.t_model if self.same_vocab else None
        return heldout_figures(model, self.tokenizer, self.eval_renderer, rows, self.eval_feats, self.cfg.eval,
                               self.vocab_size, teacher=live, device=self.device, judge=self.trust.answer_judge())

    def _teacher_figures(self) -> dict:
        if self.t_model is not None:
            t_model, t_tok = self.t_weights
            if self.same_vocab:
                renderer, feats, vocab = self.eval_renderer, self.eval_feats, self.vocab_size
            else:  # the teacher is measured with its own tokenizer (and its own end of turn)
                renderer = teacher_renderer(self.cfg, t_tok, primary_teacher(self.cfg))
                feats, _ = encode_examples(renderer, self.eval_rows)
                vocab = min(output_vocab_size(t_model), len(t_tok))
            return heldout_figures(t_model, t_tok, renderer, self.eval_rows, feats, self.cfg.eval, vocab,
                                   is_teacher=True, device=self.device, judge=self.trust.answer_judge())
        if self.teacher is None:
            return {"metrics": {}, "outputs": []}
        ho = HeldOut(self.cfg, self.eval_rows, self.eval_feats, self.out, self.tokenizer.pad_token_id, self.say,
                     keep=self.out / "eval_teacher.json" if self.training else None)
        with self.acc.main_process_first():  # asked once; the other processes find it on disk
            return self.teacher.heldout(ho)

    def baseline(self) -> None:
        self.say(f"evaluating the teacher and the initial student on {len(self.eval_rows)} held-out rows"
                 if self.training else f"evaluating teacher and student on {len(self.eval_rows)} held-out rows")
        cfg = self.cfg
        # the figures are kept for a rerun, keyed by what they depend on: rows, eval settings, the model
        fp = eval_fingerprint(cfg, self.eval_rows)
        t_key = f"{fp}:{_digest([t.model_dump(mode='json') for t in teacher_configs(cfg)])}"
        s_key = f"{fp}:{_digest(cfg.student.model_dump(mode='json'))}"
        keep = self.out / "eval_teacher.json" if self.training and self.t_model is not None else None
        self.teacher_ev = memo_json(keep, lambda: {**self._teacher_figures(), "key": t_key},
                                    valid=lambda v: v.get("key") == t_key)
        self.initial_ev = (memo_json(self.out / "eval_student_initial.json",
                                     lambda: {**self._student_figures(self.student), "key": s_key},
                                     valid=lambda v: v.get("key") == s_key) if self.training else None)
        self.trust.baseline()

    # -- phase 4: fit ------------------------------------------------------------------------

    def fit(self) -> None:
        cfg, acc = self.cfg, self.acc
        if self.t_model is not None and not uses_model(self.teacher, self.t_model):
            # the signal comes from a cache: train without the teacher model in memory
            self.freed_teacher_params = count_params(self.t_model)
            self.t_weights = None
            gc.collect()
            self.say("teacher model freed for training (signal from the cache); it is reloaded for the final evaluation")
        self.say(f"training ({self.method.describe()}) on {len(self.feats)} rows")
        stages = StageRunner(cfg, self.tokenizer, self.t_model, self.vocab_size, self.device, self.eval_rows,
                             self.eval_feats, self.progress and acc.is_main_process, self.say)
        staged = self.method.fit(self.student, stages)  # multi-pass methods (stages); None = one trainer pass
        if staged is not None:
            self.student, training = staged
            self.training_summary = {**training, "truncated_rows": self.truncated}
            self.teacher_layers = getattr(self.student.config, "kdistill_teacher_layers", self.teacher_layers)
            return
        wrapper = StudentLM(self.student, self.method.trainable_modules())
        curriculum = None
        if cfg.curriculum.by != "none":
            live = self.t_model if self.same_vocab else None
            scores = difficulty(cfg.curriculum, self.feats, self.out, live, self.tokenizer.pad_token_id,
                                self.vocab_size, cfg.eval.batch_size)
            curriculum = (cfg.curriculum, scores)
        keeper = None
        if cfg.eval.every and shards_models(acc):
            raise ConfigError("eval.every: not available under FSDP2 / DeepSpeed ZeRO-3 (the student is sharded while "
                              "it trains); the final figures are still measured")
        if cfg.eval.every:
            keeper = BestKeeper(cfg.eval.select_best, lambda s: self._student_figures(s)["metrics"], self.out, self.say,
                                fresh=latest_checkpoint(self.out / "checkpoints") is None)
        collate_fn = make_collate(cfg.train.batching, self.tokenizer.pad_token_id, self.student)
        with InterruptGuard() as guard:  # Ctrl-C: stop after this step, still report (and say so)
            result = train(wrapper, self.method, self.feats, collate_fn,
                           cfg.train, self.out, accelerator=acc, progress=self.progress, curriculum=curriculum,
                           evaluator=(cfg.eval.every, keeper) if keeper is not None else None, interrupt=guard,
                           say=self.say)
        self.student = whole_student(acc, wrapper, acc.unwrap_model(wrapper).model)  # gathered when sharded
        if result.resumed_from is not None:
            self.say(f"resumed from the checkpoint at step {result.resumed_from} of {result.steps}"
                     + (" (training was already complete)" if result.resumed_from == result.steps else ""))
        training = {"steps": result.steps, "seconds": round(result.seconds, 1), "train_rows": len(self.feats),
                    "items": result.tokens, "resumed_from": result.resumed_from, "stopped_early": result.stopped_early,
                    "truncated_rows": self.truncated, "stopped_by": result.stopped_by,
                    "planned_steps": result.planned_steps, "batching": cfg.train.batching,
                    "throughput": result.throughput}
        if curriculum is not None:
            training["curriculum"] = describe(cfg.curriculum, curriculum[1], result.steps)
        if shards_models(acc):
            training["sharding"] = describe_sharding(acc, self.t_model)
        if keeper is not None:
            self.student = keeper.select(self.student, training)
        self.training_summary = training

    # -- phase 5: figures after training, report ------------------------------------------------

    def final(self) -> None:
        if self.freed_teacher_params is not None:
            self.t_weights = load_teacher_weights(self.cfg, self.say, with_tokenizer=True)
            self.t_model.to(self.device)
        self.final_ev = self._student_figures(self.student)
        # a sharded teacher gathers its weights in every forward: then every process measures
        self.speed = self._speed() if self.acc.is_main_process or shards_models(self.acc) else {}
        self.trust.final()

    def _speed(self) -> dict:
        n = self.cfg.eval.speed_prompts
        if n == 0 or not self.eval_rows:
            return {}
        new = self.cfg.eval.speed_new_tokens
        rows = self.eval_rows[:n]
        out = {}
        if self.t_model is not None:
            t_tok = self.t_weights[1]
            r = self.eval_renderer if self.same_vocab else teacher_renderer(self.cfg, t_tok, primary_teacher(self.cfg))
            out["teacher"] = measure_speed(self.t_model, t_tok, [r.prompt_ids(e) for e in rows], new, self.device)
        out["student"] = measure_speed(self.student, self.tokenizer, [self.eval_renderer.prompt_ids(e) for e in rows],
                                       new, self.device)
        return out

    def _describe_teacher(self) -> dict:
        prim = primary_teacher(self.cfg)
        if self.t_model is not None:
            return {"name": display_name(prim.model), **param_counts(self.t_model), "kind": "local"}
        if self.teacher is None:
            return {"name": "(teacher-written data)", "params": None, "kind": "none"}
        d = self.teacher.describe()
        d["params"] = d.get("params") or self.freed_teacher_params or self.teacher_ev.get("params")
        return d

    def _unavailable(self) -> dict:
        if self.t_model is not None:
            if self.same_vocab:
                return {}
            why = "teacher and student tokenizers differ (no token-level comparison)"
            return {"kl_to_teacher": why, "top1_agreement": why,
                    "perplexity": "per-token perplexities under different tokenizers are not comparable (each model's "
                                  "own perplexity is still reported)"}
        if self.teacher is None:
            why = "no teacher is available at train time (teacher-written data only)"
            return {k: why for k in ("accuracy", "perplexity", "kl_to_teacher", "top1_agreement")}
        return self.teacher.unavailable(self.teacher_ev)

    def report_and_save(self) -> dict:
        student_desc = {"name": self.student_name, **student_facts(self.student, self.cfg, self.out),
                        "teacher_layers": self.teacher_layers}
        method_summary = self.method.summary() if self.method is not None and self.training else {}
        rep = build_report(self.cfg.method, self._describe_teacher(), student_desc, self.teacher_ev, self.initial_ev,
                           self.final_ev, self.eval_rows, self.cfg.eval.show_samples, self.speed,
                           self.training_summary, method_summary, self._unavailable())
        if self.method is not None:
            rep.update(self.method.report_extras())
        if self.mixture:
            rep["data_mixture"] = self.mixture
        self.trust.report(rep)
        if self.acc.is_main_process:
            if self.training:
                sdir = self.out / "student"
                save_student(self.student, self.tokenizer, sdir, self.cfg)
                (sdir / "README.md").write_text(model_card(rep, dump_config(self.cfg)))
            write_report(rep, self.out)
        return rep


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _SingleProcess:
    """``kdistill eval`` runs in one process without an accelerator: the same few attributes."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def main_process_first(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        """One process: nothing to wait for."""


def check_launch(num_processes: int) -> None:
    """Refuse N copies of one run: a launcher started several processes but accelerate sees one
    (on CPUs accelerate only goes multi-process when asked: ``accelerate launch --cpu``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and num_processes == 1:
        raise ConfigError(f"launched as {launched} processes (WORLD_SIZE), but accelerate runs each as a separate "
                          "single-process run; without GPUs use `accelerate launch --cpu` or set ACCELERATE_USE_CPU=true")
