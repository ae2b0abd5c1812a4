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
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdistill.batching import grouped_schedule, padding_counts
from kdistill.curriculum import schedule
from kdistill.throughput import StepMeter, cache_file, clock, peak_flops


@dataclass
class TrainResult:
    steps: int
    resumed_from: Optional[int]
    seconds: float
    tokens: int
    stopped_early: bool
    throughput: Optional[dict] = None  # tokens/s, MFU, padding share, step split (kdistill.throughput)


@functools.lru_cache(maxsize=2)
def _epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch: a seeded shuffle, the last partial batch kept."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def _latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    done = [p for p in ckpt_root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


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
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tcfg.lr_scheduler]
    scheduler = get_scheduler(
        sched_name, optimizer, num_warmup_steps=int(tcfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    # The schedule counts optimizer steps of the whole run (total_steps is already global), so it is
    # not handed to accelerate.prepare: its wrapper would step it once per process per step.
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)

    # ---- resume -------------------------------------------------------------------------------
    ckpt_root = output_dir / "checkpoints"
    metrics_path = output_dir / "metrics.jsonl"
    step, cursor, tokens_seen, resumed_from = 0, 0, 0, None
    latest = _latest_checkpoint(ckpt_root)
    if latest is not None:
        acc.load_state(str(latest))
        state = json.loads((latest / "trainer_state.json").read_text())
        step, cursor, tokens_seen = state["step"], state["cursor"], state["tokens"]
        resumed_from = step
        if acc.is_main_process and metrics_path.exists():  # drop rows logged after that checkpoint
            rows = [l for l in metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            metrics_path.write_text("".join(r + "\n" for r in rows))
    elif acc.is_main_process and metrics_path.exists():
        metrics_path.unlink()

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
                yield _move(collate_fn([features[k] for k in rows]), acc.device)
            g += 1

    stream = micro_batches(cursor)
    early: list[dict] = []  # the next step's micro-batches, already shown to method.lookahead
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    t0 = time.time()
    stopped_early = False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.mixed_precision, next(model.parameters()).dtype)
    meter = StepMeter(acc.unwrap_model(model), *peak_flops(acc.device, dtype, tcfg.peak_tflops, cache_file()))
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
        grad_norm = None
        if tcfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(params, tcfg.max_grad_norm)
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
        loss_value = float(acc.reduce(step_loss, reduction="sum")) if world > 1 else float(step_loss)
        if acc.is_main_process and (step % tcfg.log_every == 0 or step == total_steps or scores):
            row = {
                "step": step,
                "loss": round(loss_value, 6),
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                "items": int(n_global),
                "elapsed_s": round(time.time() - t0, 2),
                **speed,
                **{k: round(v, 6) for k, v in extra.items()},
                **{f"eval_{k}": v for k, v in scores.items()},
            }
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")

        # 4. checkpoint (and stop on the wall-clock budget)
        out_of_time = tcfg.max_minutes is not None and (time.time() - t0) / 60 >= tcfg.max_minutes
        if step % tcfg.save_every == 0 or out_of_time or step == total_steps:
            _save_checkpoint(acc, ckpt_root, step, cursor, tokens_seen, tcfg.save_total_limit)
        if out_of_time and step < total_steps:
            stopped_early = True
            break
    if bar is not None:
        bar.close()
    model.eval()
    return TrainResult(step, resumed_from, time.time() - t0, tokens_seen, stopped_early, meter.summary())


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _save_checkpoint(acc, root: Path, step: int, cursor: int, tokens: int, keep: int) -> None:
    """Write ``step-N`` atomically (tmp folder, then rename) and prune old checkpoints."""
    final = root / f"step-{step}"
    if final.exists():
        return
    tmp = root / f".tmp-step-{step}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "cursor": cursor, "tokens": tokens}))
        tmp.rename(final)
        done = sorted(
            (p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()), key=lambda p: int(p.name.split("-")[1])
        )
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
