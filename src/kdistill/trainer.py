"""The one training loop every method shares.

Read it top to bottom: build batches -> for each optimizer step, collect the micro-batches,
count the items the loss averages over *across all of them and all processes*, then
forward/backward each micro-batch with its loss divided by that global count (so gradient
accumulation and data parallelism give the same gradient as one big batch), clip, step, log,
checkpoint.

Runs on CPU, one GPU or many (``accelerate launch``) without changes. Checkpoints are
``output_dir/checkpoints/step-N`` (accelerate state: model as safetensors, optimizer, scheduler,
RNG) plus ``trainer_state.json``; a rerun on the same ``output_dir`` resumes from the newest one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdistill.batching import grouped_schedule, padding_counts
from kdistill.curriculum import schedule
from kdistill.errors import TrainingError
from kdistill.store import append_jsonl, atomic_write, dumps_jsonl, read_json, read_jsonl_rows
from kdistill.throughput import StepMeter, cache_file, clock, machine_key, peak_flops, remember_peak

log = logging.getLogger("kdistill")


@dataclass
class TrainResult:
    steps: int
    resumed_from: Optional[int]
    seconds: float
    tokens: int
    stopped_early: bool
    stopped_by: Optional[str] = None  # what ended it before its plan: train.max_minutes, train.max_steps or interrupt
    planned_steps: Optional[int] = None  # the steps it was planned for (by epochs, when max_steps is fewer)
    throughput: Optional[dict] = None  # tokens/s, MFU, padding share, step split (kdistill.throughput)


class InterruptGuard:
    """``with InterruptGuard() as g: train(..., interrupt=g)``: the first Ctrl-C asks training to stop
    after the current step (checkpoint saved, ``stopped_by="interrupt"``) so the run can still
    report; a second one interrupts at once. Outside the main thread it does nothing."""

    def __init__(self):
        self.hit = False
        self._old = None

    def _handle(self, signum, frame):
        self.hit = True
        signal.signal(signal.SIGINT, self._old)  # a second Ctrl-C is an ordinary KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._old is not None and not self.hit:
            signal.signal(signal.SIGINT, self._old)
        return False


@functools.lru_cache(maxsize=2)
def _epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch: a seeded shuffle, the last partial batch kept."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def checkpoints(ckpt_root: Path) -> list[tuple[Path, dict]]:
    """Finished checkpoints, newest first, with their ``trainer_state.json`` (one that cannot be read,
    e.g. torn by a full disk, is skipped: the one before it is used)."""
    found = []
    for p in Path(ckpt_root).glob("step-*"):
        state = read_json(p / "trainer_state.json")
        if isinstance(state, dict) and all(k in state for k in ("step", "cursor", "tokens")):
            found.append((p, state))
    return sorted(found, key=lambda ps: -int(ps[1]["step"]))


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    found = checkpoints(ckpt_root)
    return found[0][0] if found else None


def _move(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(
    model: nn.Module,
    method,
    features: list[dict],
    collate_fn: Callable[[list[dict]], dict],
    tcfg,
    output_dir: Path,
    accelerator=None,
    progress: bool = True,
    curriculum=None,
    evaluator=None,
    interrupt: Optional[InterruptGuard] = None,
    say: Optional[Callable[[str], None]] = None,
) -> TrainResult:
    """Train ``model`` (a :class:`~kdistill.models.student.StudentLM`) in place with ``method`` (a
    :class:`~kdistill.methods.base.Method`: ``prepare_batch``, ``num_items``, ``loss``).

    Args:
        features: encoded rows (``input_ids``, ``labels``, ``id``).
        tcfg: the config's ``train`` section.
        output_dir: where ``metrics.jsonl`` and ``checkpoints/`` go.
        curriculum: ``(config, difficulty per row)`` for an easiest-first start
            (:mod:`kdistill.curriculum`); None = shuffled epochs throughout.
        evaluator: ``(every, fn)``: after every ``every``-th optimizer step, ``fn(step, model)``
            returns held-out metrics, logged as ``eval_*`` rows in ``metrics.jsonl``.
        interrupt: an :class:`InterruptGuard`: after a Ctrl-C, stop like ``max_minutes`` does.
        say: gets one line after the second step: the measured step time and the time estimate.

    Each ``metrics.jsonl`` row also goes to the accelerator's trackers (``train.report_to``), if any.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    output_dir = Path(output_dir)
    acc = accelerator or Accelerator(mixed_precision=tcfg.mixed_precision)
    set_seed(tcfg.seed)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)

    ga = tcfg.gradient_accumulation_steps
    world, rank = acc.num_processes, acc.process_index
    per_epoch = math.ceil(len(features) / tcfg.batch_size)  # global micro-batches per epoch
    steps_per_epoch = max(1, per_epoch // (ga * world))
    by_epochs = max(1, math.ceil(tcfg.epochs * steps_per_epoch)) if tcfg.epochs else None
    total_steps = tcfg.max_steps or by_epochs

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tcfg.lr_scheduler]
    scheduler = get_scheduler(
        sched_name, optimizer, num_warmup_steps=int(tcfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    # The schedule counts optimizer steps of the whole run (total_steps is already global), so it is
    # not handed to accelerate.prepare: its wrapper would step it once per process per step.
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters: clip those
    acc.register_for_checkpointing(scheduler)

    # ---- resume -------------------------------------------------------------------------------
    ckpt_root = output_dir / "checkpoints"
    metrics_path = output_dir / "metrics.jsonl"
    step, cursor, tokens_seen, resumed_from, seconds_before = 0, 0, 0, None, 0.0
    for ckpt, state in checkpoints(ckpt_root):  # the newest one that loads
        try:
            acc.load_state(str(ckpt))
        except Exception as exc:  # noqa: BLE001 - a torn checkpoint: fall back to the one before it
            log.warning("checkpoint %s cannot be loaded (%s: %s); trying the one before it", ckpt.name,
                        type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
            continue
        step, cursor, tokens_seen = state["step"], state["cursor"], state["tokens"]
        resumed_from, seconds_before = step, float(state.get("seconds", 0.0))
        break
    if acc.is_main_process and metrics_path.exists():  # drop rows logged after that checkpoint (all of them: fresh)
        rows = read_jsonl_rows(metrics_path, key="step", repair=False)[0]
        atomic_write(metrics_path, dumps_jsonl(r for k, r in sorted(rows.items()) if k <= step))

    pick = None
    if curriculum is not None:
        cc, scores = curriculum
        pick = schedule(cc, scores, tcfg.batch_size, tcfg.seed, total_steps, ga * world)
    grouped = grouped_schedule(features, tcfg.batch_size, tcfg.seed) if tcfg.batching == "length_grouped" else None

    def micro_batches(start: int):
        """This process's micro-batches from global index ``start`` on, epoch after epoch.

        Global micro-batch g (epoch g // per_epoch, or the curriculum's pick while it lasts) goes
        to process g % world, so a resumed run sees exactly the batches it would have seen
        without the interruption.
        """
        g = start
        while True:
            if g % world == rank:
                rows = pick(g) if pick is not None else None
                if rows is None:
                    epoch, j = divmod(g, per_epoch)
                    rows = (grouped(epoch) if grouped is not None
                            else _epoch_batches(len(features), tcfg.batch_size, tcfg.seed, epoch))[j]
                batch = _move(collate_fn([features[k] for k in rows]), acc.device)
                batch["micro_batch"] = g  # global index: a method's per-batch draws key on it (same after a resume)
                yield batch
            g += 1

    stream = micro_batches(cursor)
    early: list[dict] = []  # the next step's micro-batches, already shown to method.lookahead
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    t0 = time.time()
    seconds = seconds_before  # a rerun of a finished run adds no time
    stopped_early, stopped_by, t_step = False, None, None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.mixed_precision, next(model.parameters()).dtype)
    meter = StepMeter(acc.unwrap_model(model), *peak_flops(acc.device, dtype, tcfg.peak_tflops, cache_file()),
                      remember=None if tcfg.peak_tflops else functools.partial(
                          remember_peak, cache_file(), machine_key(acc.device, dtype)))
    model.train()
    while step < total_steps:
        # 1. the micro-batches of this optimizer step, and the global item count
        meter.start()
        with clock.section("sample"):
            group = [method.prepare_batch(b, model) for b in (early or [next(stream) for _ in range(ga)])]
        early = []
        if method.looks_ahead and step + 1 < total_steps:  # the cursor counts only what is trained: resume
            early = [next(stream) for _ in range(ga)]     # is unchanged
            method.lookahead(early)
        counts = torch.tensor([method.num_items(b) for b in group], device=acc.device, dtype=torch.float32)
        n_global = acc.reduce(counts.sum(), reduction="sum") if world > 1 else counts.sum()
        n_global = n_global.clamp(min=1.0)

        # 2. forward/backward each micro-batch (loss = its share of the global mean)
        step_loss = torch.zeros((), device=acc.device)
        extra: dict = {}
        for i, batch in enumerate(group):
            sync = i == len(group) - 1
            ctx = acc.no_sync(model) if (not sync and world > 1) else _nullcontext()
            with ctx:
                loss, info = method.loss(model, batch, n_global)
                acc.backward(loss * world)  # DDP averages gradients over processes; undo that
            step_loss += loss.detach()
            for k, v in info.items():
                extra[k] = extra.get(k, 0.0) + float(v) / len(group)
        # clip (max_grad_norm), or just measure (inf): either way the norm shows a non-finite gradient
        grad_norm = acc.clip_grad_norm_(params, tcfg.max_grad_norm if tcfg.max_grad_norm is not None else math.inf)
        loss_value = float(acc.reduce(step_loss, reduction="sum")) if world > 1 else float(step_loss)
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
            optimizer.zero_grad(set_to_none=True)  # nothing of this step reaches the weights
            last = latest_checkpoint(ckpt_root)
            raise TrainingError(
                f"training stopped at step {step + 1}: the loss is {loss_value:g} and the gradient norm "
                f"{float(grad_norm):g}; no update was applied and no student saved (last good checkpoint: "
                f"{last.name if last else 'none'}); lower train.learning_rate or check loss.temperature and the data")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        cursor += ga * world
        tokens_seen += int(n_global)
        real, positions = (sum(c) for c in zip(*(padding_counts(b) for b in group)))
        speed = meter.stop(real, positions, int(n_global))

        # 3. periodic held-out evaluation (every process evaluates), then the log row
        scores: dict = {}
        if evaluator is not None and step % evaluator[0] == 0:
            model.eval()
            scores = evaluator[1](step, acc.unwrap_model(model)) or {}
            model.train()
        if acc.is_main_process and (step % tcfg.log_every == 0 or step == total_steps or scores):
            row = {
                "step": step,
                "loss": round(loss_value, 6),
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": round(float(grad_norm), 4),
                "items": int(n_global),
                "elapsed_s": round(time.time() - t0, 2),
                **speed,
                **{k: round(v, 6) for k, v in extra.items()},
                **{f"eval_{k}": v for k, v in scores.items()},
            }
            try:
                append_jsonl(metrics_path, [row])
            except OSError as exc:
                raise TrainingError(f"cannot write {metrics_path} ({exc.strerror or exc}); the checkpoints saved "
                                    "before are intact: rerun the same command once it can be written") from None
            if acc.trackers:
                acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if say is not None and acc.is_main_process:
            t_step = _estimate(say, step, total_steps, t0, t_step, tcfg.max_minutes, resumed_from)

        # 4. checkpoint (and stop on the wall-clock budget)
        seconds = seconds_before + time.time() - t0  # training time of the whole run, resumes added up
        out_of_time = tcfg.max_minutes is not None and (time.time() - t0) / 60 >= tcfg.max_minutes
        stop = out_of_time or (interrupt is not None and interrupt.hit)
        if step % tcfg.save_every == 0 or stop or step == total_steps:
            _save_checkpoint(acc, ckpt_root, step, cursor, tokens_seen, tcfg.save_total_limit, seconds)
        if stop and step < total_steps:
            stopped_early, stopped_by = True, "train.max_minutes" if out_of_time else "interrupt"
            break
    if bar is not None:
        bar.close()
    model.eval()
    if not stopped_early and by_epochs is not None and step < by_epochs:  # max_steps cut the epochs short
        stopped_early, stopped_by = True, "train.max_steps"
    return TrainResult(step, resumed_from, seconds, tokens_seen, stopped_early, stopped_by,
                       max(total_steps, by_epochs or 0), meter.summary())


def _estimate(say, step: int, total: int, t0: float, t_step, max_minutes, resumed_from) -> float:
    """After the first step of this session: the time mark; after the second: say the step time
    (the first step includes warm-up) and the estimate, and what ``max_minutes`` will cut."""
    done = step - (resumed_from or 0)
    now = time.time()
    if done == 2 and t_step is not None and step < total:
        per = now - t_step
        left = (total - step) * per
        line = (f"training: one step takes {per:.1f} s here; about {left / 60:.1f} min for the remaining "
                f"{total - step} of {total} steps")
        if max_minutes is not None and (now - t0) + left > 60 * max_minutes:
            reach = step + int(max(0.0, 60 * max_minutes - (now - t0)) / per)
            line += (f"; train.max_minutes={max_minutes:g} will stop it near step {reach} (--set "
                     f"train.max_minutes=... to train all {total})")
        say(line)
    return now


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _save_checkpoint(acc, root: Path, step: int, cursor: int, tokens: int, keep: int, seconds: float) -> None:
    """Write ``step-N`` atomically (tmp folder, then rename) and prune old checkpoints.

    A checkpoint that cannot be written (a full disk, a folder made read-only) stops training with
    one line; its temp folder is removed and every checkpoint saved before stays as it was.
    """
    final = root / f"step-{step}"
    if final.exists():
        return
    tmp = root / f".tmp-step-{step}"
    try:
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            atomic_write(tmp / "trainer_state.json",
                         json.dumps({"step": step, "cursor": cursor, "tokens": tokens, "seconds": seconds}))
            tmp.rename(final)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise TrainingError(f"cannot write the checkpoint {final} ({reason}); the checkpoints saved before are "
                            "intact: free space (or make the folder writable) and rerun the same command") from None
    if acc.is_main_process:
        for old, _ in checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
