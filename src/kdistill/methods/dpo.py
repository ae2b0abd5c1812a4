"""Direct Preference Optimization (Rafailov et al. 2023): zephyr's dDPO stage and ``method: dpo``.

A pair is a prompt with a *chosen* and a *rejected* answer (text, rendered with the chat template
like any training row; only the answer tokens count). The reference model's sequence log-probs
are computed once, under ``no_grad``, before training and stored in the features, so the
reference is not kept in memory while the policy trains. A batch holds the chosen rows followed by
the rejected rows (``[2·pairs, seq]``); :meth:`DPOMethod.num_items` counts *pairs*, so the loss is
a mean over pairs across gradient accumulation and processes.

``method: dpo`` trains the student on ``dpo.pairs`` with the initial student as the reference.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import torch
from pydantic import Field

from kdistill.data import IGNORE_INDEX, Example, collate, parse_row, read_jsonl
from kdistill.errors import DataError
from kdistill.losses import dpo_loss
from kdistill.methods.base import Method, RunContext, register
from kdistill.models import hf_model, load_saved, model_label_logprobs, save_model
from kdistill.settings import Section
from kdistill.stages import combine_metrics, train_config
from kdistill.store import run_stage

class DPOConfig(Section):
    """DPO (Rafailov et al. 2023): zephyr's third stage, or ``method: dpo`` on a pairs file."""

    beta: float = Field(0.1, gt=0.0, description="strength of the KL anchor to the reference model")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="conservative DPO: assumed share of flipped labels")
    pairs: Optional[str] = Field(None, description="method dpo: JSONL of {id?, prompt|messages, chosen, rejected}")
    max_steps: Optional[int] = Field(None, ge=1, description="DPO optimizer steps (none = train.max_steps)")
    learning_rate: Optional[float] = Field(None, gt=0.0, description="none = train.learning_rate")


def encode_pair(renderer, example: Example, chosen: str, rejected: str, pair_id: str) -> Optional[dict]:
    """Both answers rendered after the prompt; None when an answer has no token left (max_length)."""
    c = renderer.encode(example, response=chosen)
    r = renderer.encode(example, response=rejected)
    if all(l == IGNORE_INDEX for l in c["labels"]) or all(l == IGNORE_INDEX for l in r["labels"]):
        return None
    return {"id": pair_id, "chosen": c, "rejected": r, "ref_chosen": 0.0, "ref_rejected": 0.0}


def collate_pairs(features: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows, right-padded to one width; ``ref_logps`` ``[2·pairs]``."""
    rows = [f["chosen"] for f in features] + [f["rejected"] for f in features]
    b = collate(rows, pad_id)
    b["ref_logps"] = torch.tensor([f["ref_chosen"] for f in features] + [f["ref_rejected"] for f in features],
                                  dtype=torch.float32)
    b["n_pairs"] = len(features)
    b["ids"] = [f["id"] for f in features]
    return b


@torch.no_grad()
def pair_logps(model, features: list[dict], pad_id: int, vocab_size: int, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Sequence log-prob sums of the chosen and the rejected answers under ``model``."""
    hf = hf_model(model)
    device = next(hf.parameters()).device
    was = hf.training
    hf.eval()
    ch, rj = [], []
    for i in range(0, len(features), batch_size):
        chunk = features[i : i + batch_size]
        b = collate_pairs(chunk, pad_id)
        lp = model_label_logprobs(hf, b["input_ids"].to(device), b["attention_mask"].to(device),
                                  b["labels"].to(device), vocab_size).sum(-1).tolist()
        ch += lp[: len(chunk)]
        rj += lp[len(chunk):]
    hf.train(was)
    return ch, rj


def set_reference(reference, features: list[dict], pad_id: int, vocab_size: int, batch_size: int = 8) -> None:
    ch, rj = pair_logps(reference, features, pad_id, vocab_size, batch_size)
    for f, c, r in zip(features, ch, rj):
        f["ref_chosen"], f["ref_rejected"] = c, r


def pair_stats(model, features: list[dict], pad_id: int, vocab_size: int, beta: float, batch_size: int = 8) -> dict:
    """On the given pairs: mean log-prob margin log π(chosen) − log π(rejected), mean implicit reward
    margin β·((log π − log π_ref)(chosen) − (…)(rejected)) and the share of pairs where it is > 0."""
    if not features:
        return {}
    ch, rj = pair_logps(model, features, pad_id, vocab_size, batch_size)
    logp_margin = [c - r for c, r in zip(ch, rj)]
    reward_margin = [beta * ((c - f["ref_chosen"]) - (r - f["ref_rejected"])) for f, c, r in zip(features, ch, rj)]
    n = len(features)
    return {
        "logp_margin": round(sum(logp_margin) / n, 6),
        "reward_margin": round(sum(reward_margin) / n, 6),
        "reward_accuracy": round(sum(m > 0 for m in reward_margin) / n, 4),
    }


class DPOMethod(Method):
    """The DPO loss on pair batches (see :func:`collate_pairs`)."""

    name = "dpo"

    def __init__(self, ctx: RunContext, beta: Optional[float] = None, label_smoothing: Optional[float] = None):
        super().__init__(ctx)
        dc = ctx.cfg.dpo
        self.beta = float(beta if beta is not None else dc.beta)
        self.label_smoothing = float(label_smoothing if label_smoothing is not None else dc.label_smoothing)
        self.history: list[tuple[float, float]] = []  # (reward margin, accuracy) per micro-batch

    def num_items(self, batch: dict) -> int:
        return int(batch["n_pairs"])

    def loss(self, model, batch, num_items):
        V = self.ctx.vocab_size
        n = batch["n_pairs"]
        logps = model_label_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], V,
                                     self.ctx.cfg.loss.chunk_size).sum(-1)
        ref = batch["ref_logps"]
        losses, rc, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta, self.label_smoothing)
        margin, acc = float((rc - rr).mean()), float((rc > rr).float().mean())
        self.history.append((margin, acc))
        info = {"reward_margin": margin, "reward_accuracy": acc, "chosen_reward": float(rc.mean()),
                "rejected_reward": float(rr.mean())}
        return losses.sum() / num_items, info

    def summary(self) -> dict:
        h = self.history
        if not h:
            return {"beta": self.beta}
        k = max(1, len(h) // 5)
        avg = lambda xs, i: round(sum(x[i] for x in xs) / len(xs), 6)  # noqa: E731
        return {
            "beta": self.beta,
            "train_batches": len(h),
            "train_reward_margin_first": avg(h[:k], 0),
            "train_reward_margin_last": avg(h[-k:], 0),
            "train_reward_accuracy_first": avg(h[:k], 1),
            "train_reward_accuracy_last": avg(h[-k:], 1),
        }


def dpo_stage(ctx: RunContext, runner, student, reference, pairs: list[dict], stage_dir: Path,
              beta: float, label_smoothing: float, tcfg) -> tuple[torch.nn.Module, dict]:
    """Train ``student`` with DPO on encoded ``pairs`` against ``reference``; resumable, skipped when done.

    The summary has the pairs' margins before and after training, and the trainer's figures.
    """
    stage_dir = Path(stage_dir)
    return run_stage(stage_dir, lambda: _dpo_stage(ctx, runner, student, reference, pairs, stage_dir, beta,
                                                   label_smoothing, tcfg),
                     lambda done: load_saved(student, stage_dir / "student"))


def _dpo_stage(ctx, runner, student, reference, pairs, stage_dir: Path, beta: float, label_smoothing: float, tcfg):
    if not pairs:
        raise DataError("dpo: no preference pairs to train on")
    pad, V = ctx.tokenizer.pad_token_id, ctx.vocab_size
    t0 = time.time()
    set_reference(reference, pairs, pad, V)
    before = pair_stats(student, pairs, pad, V, beta)
    method = DPOMethod(ctx, beta, label_smoothing)
    student, result = runner.train(student, method, pairs, stage_dir, collate_fn=lambda b: collate_pairs(b, pad),
                                   tcfg=tcfg)
    after = pair_stats(student, pairs, pad, V, beta)
    save_model(student, stage_dir / "student")
    summary = {
        "pairs": len(pairs), "beta": beta, "steps": result.steps, "resumed_from": result.resumed_from,
        "seconds": round(time.time() - t0, 1), "before": before, "after": after, "training": method.summary(),
        "heldout": runner.evaluate(student),
    }
    return student, summary


@register
class StandaloneDPO(DPOMethod):
    """``method: dpo``: DPO on ``dpo.pairs`` with the initial student as the frozen reference."""

    sections = {"dpo": DPOConfig}
    single_pass = False

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.dpo.pairs is None:
            raise ValueError("method dpo: set dpo.pairs (a JSONL of prompt, chosen, rejected)")

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.stage: dict = {}

    def fit(self, student, runner):
        cfg = self.ctx.cfg
        path = cfg.dpo.pairs
        pairs, skipped = [], 0
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            ex = parse_row(row, where, require_response=False)
            c, r = ex.extra.get("chosen"), ex.extra.get("rejected")
            if not isinstance(c, str) or not isinstance(r, str):
                raise DataError(f"{where}: a pair needs string 'chosen' and 'rejected' answers")
            f = encode_pair(self.ctx.renderer, ex, c, r, ex.id)
            if f is None:
                skipped += 1
            else:
                pairs.append(f)
        reference = copy.deepcopy(hf_model(student)).eval()
        tcfg = train_config(cfg.train, max_steps=cfg.dpo.max_steps, learning_rate=cfg.dpo.learning_rate)
        student, self.stage = dpo_stage(self.ctx, runner, student, reference, pairs, Path(self.ctx.output_dir) / "dpo",
                                        self.beta, self.label_smoothing, tcfg)
        self.stage["pairs_skipped_max_length"] = skipped
        combine_metrics(self.ctx.output_dir, [("dpo", Path(self.ctx.output_dir) / "dpo")])
        del reference
        return student, {"steps": self.stage["steps"], "seconds": self.stage["seconds"], "train_rows": len(pairs),
                         "resumed_from": self.stage.get("resumed_from"), "stopped_early": False}

    def summary(self) -> dict:
        return self.stage

