"""Cut search (``student.init.search``): which depth/width split to cut at a parameter budget.

The way Minitron picks its candidates, at laptop scale:

1. **candidates** at the budget (``target_params``): given ones, or generated — the depth-only cut
   (the most blocks that fit), all blocks with the width axes pruned to one common fraction that
   fits (width-only; MLP channels then fill what rounding left), and ``depth_levels − 2`` mixes in
   between (fewer blocks, wider);
2. **probe**: each candidate is cut from the teacher and distilled for ``probe_steps`` steps
   (forward KL at T = 1 on the training rows, AdamW, the same batches for every candidate);
3. **score**: its mean per-token KL to the teacher on ``probe_eval_rows`` training rows the probe
   did not train on (the run's held-out rows stay unseen); the lowest wins.

The winner is then built afresh (not the probed weights) so the run's distillation starts from the
pruned teacher like any other cut. The comparison goes into ``student_layers.json`` and the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from kdistill.data import collate
from kdistill.errors import ConfigError
from kdistill.evaluate import logit_metrics
from kdistill.losses import distill_loss, divergence, fused_distill_loss
from kdistill.models import count_params, cut_student, final_hidden, num_layers, supports_hidden
from kdistill.models.width import count_pruned, prune_width, width_plan


@dataclass
class Candidate:
    """One depth/width split: ``num_layers`` blocks and ``width`` keep fractions per axis."""

    num_layers: int
    width: dict = field(default_factory=dict)
    params: int = 0

    def kind(self, total_layers: int) -> str:
        if not self.width:
            return "depth-only"
        return "width-only" if self.num_layers == total_layers else "depth+width"

    def label(self) -> str:
        w = ", ".join(f"{a} {f:.2f}" for a, f in self.width.items())
        return f"{self.num_layers} layers" + (f", {w}" if w else "")


def build_cut(base: nn.Module, layers: list[int], plan: dict) -> nn.Module:
    """``base`` cut to ``layers`` and pruned by ``plan`` (see :mod:`kdistill.models.width`)."""
    student = cut_student(base, layers)
    return prune_width(student, plan) if plan else student


def _fit_fraction(count: Callable[[float], int], budget: float) -> Optional[float]:
    """The largest common keep fraction whose parameter count is within ``budget`` (bisection)."""
    if count(1.0) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    if count(0.02) > budget:
        return None
    for _ in range(24):
        mid = (lo + hi) / 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return max(math.floor(lo * 1e4) / 1e4, 0.02)


def candidates(sc, base: nn.Module, layers_for: Callable[[int], list[int]], budget: float) -> list[Candidate]:
    """The candidates of ``sc`` (given or generated) at ``budget`` parameters, each with its count."""
    total = num_layers(base)
    limit = budget * (1 + sc.tolerance)

    def count(n: int, width: dict) -> int:
        return count_pruned(base, layers_for(n), width)

    if sc.candidates:
        out = []
        for i, c in enumerate(sc.candidates):
            n = c.num_layers or total
            if n > total:
                raise ConfigError(f"student.init.search.candidates[{i}].num_layers: the teacher has {total} blocks")
            cand = Candidate(n, c.width.fractions() if c.width else {})
            cand.params = count(n, cand.width)
            if cand.params > limit:
                raise ConfigError(f"student.init.search.candidates[{i}]: {cand.params:,} parameters, over the budget "
                                  f"of {int(budget):,} (target_params)")
            out.append(cand)
        return out
    fits = [n for n in range(1, total + 1) if count(n, {}) <= budget]  # generated: within the budget itself
    n_depth = max(fits) if fits else 1
    depths = sorted({round(n_depth + k * (total - n_depth) / (sc.depth_levels - 1)) for k in range(sc.depth_levels)})
    out = []
    for n in depths:
        if n == n_depth and fits:
            out.append(Candidate(n, {}, count(n, {})))
            continue
        f = _fit_fraction(lambda x: count(n, {a: x for a in sc.axes}), budget)
        if f is not None and f < 1.0:
            width = {a: f for a in sc.axes}
            if "mlp" in width and len(width) > 1:  # sizes are discrete: MLP channels fill what is left
                width["mlp"] = max(f, _fit_fraction(lambda x: count(n, {**width, "mlp": max(x, f)}), budget) or f)
            out.append(Candidate(n, width, count(n, width)))
    if not out:
        raise ConfigError(f"student.init.search.target_params: no cut of the teacher fits in {int(budget):,} parameters")
    return out


def _signal(teacher: nn.Module, batch: dict, vocab: int, fused: bool):
    with torch.no_grad():
        if fused:
            return final_hidden(teacher, batch["input_ids"], batch["attention_mask"]), None
        return None, teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits[..., :vocab]


@torch.no_grad()
def held_kl(student: nn.Module, teacher: nn.Module, held: list[dict], t_hidden: Optional[list], vocab: int) -> float:
    """Mean per-token KL(teacher ‖ student) at T = 1 over the labelled positions of the ``held``
    batches; ``t_hidden``: the teacher's final hidden states per batch (computed once for every
    candidate), or None to ask the teacher (then :func:`kdistill.evaluate.logit_metrics`)."""
    if t_hidden is None or not supports_hidden(student):
        feats = [f for b in held for f in b["feats"]]
        return logit_metrics(student, feats, held[0]["pad"], vocab, teacher=teacher,
                             batch_size=len(held[0]["feats"]))["kl_to_teacher"]
    s_w, t_w = student.get_output_embeddings().weight[:vocab], teacher.get_output_embeddings().weight[:vocab]
    total, n = 0.0, 0
    for b, th in zip(held, t_hidden):
        keep = b["labels"] != -100
        sh, tr = final_hidden(student, b["input_ids"], b["attention_mask"])[keep], th[keep]
        for i in range(0, sh.shape[0], 1024):
            s_lp = torch.log_softmax((sh[i: i + 1024] @ s_w.t()).float(), -1)
            t_lp = torch.log_softmax((tr[i: i + 1024] @ t_w.t()).float(), -1)
            total += float(divergence(t_lp, s_lp, "forward_kl").sum())
        n += int(keep.sum())
    return total / max(n, 1)


def probe(student: nn.Module, teacher: nn.Module, batches: list[dict], signals: list, held: list[dict],
          held_hidden: Optional[list], vocab: int, lr: float) -> dict:
    """Distill ``student`` on ``batches`` (one optimizer step each; forward KL, T = 1) and measure its
    KL to the teacher on ``held`` before and after: ``{"kl_before", "kl_after", "seconds"}``."""
    t0 = time.time()
    before = held_kl(student, teacher, held, held_hidden, vocab)
    fused = supports_hidden(student) and signals and signals[0][0] is not None
    t_weight = teacher.get_output_embeddings().weight[:vocab].detach() if fused else None
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    student.train()
    for batch, (t_hidden, t_logits) in zip(batches, signals):
        labels = batch["labels"]
        n = int((labels != -100).sum())
        if fused:
            s_hidden = final_hidden(student, batch["input_ids"], batch["attention_mask"])
            loss = fused_distill_loss(s_hidden, student.get_output_embeddings().weight[:vocab], t_hidden, t_weight,
                                      labels, num_items=n)
        else:
            if t_logits is None:
                t_logits = _signal(teacher, batch, vocab, False)[1]
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits[..., :vocab]
            loss = distill_loss(s_logits, t_logits, labels, num_items=n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    student.eval()
    after = held_kl(student, teacher, held, held_hidden, vocab)
    return {"kl_before": round(before, 6), "kl_after": round(after, 6), "seconds": round(time.time() - t0, 1)}


def search_cut(sc, teacher: nn.Module, base: nn.Module, layers_for: Callable[[int], list[int]], wscores: dict,
               feats: list[dict], pad_id: int, vocab: int, lr: float, batch_size: int, seed: int,
               say: Callable[[str], None]) -> tuple[list[int], dict, dict]:
    """Run the search; returns ``(kept blocks, width plan, report entry)``.

    ``base``: the model candidates are cut from (the teacher, or its dense twin); ``layers_for(n)``:
    which ``n`` blocks a depth of ``n`` keeps; ``wscores``: :func:`kdistill.models.width.width_scores`
    of ``base``; ``feats``: encoded training rows (the last ``probe_eval_rows`` score the probes).
    """
    if len(feats) <= sc.probe_eval_rows:
        raise ConfigError(f"student.init.search.probe_eval_rows: {sc.probe_eval_rows} rows are held out to score the "
                          f"probes, but there are only {len(feats)} training rows")
    teacher_params = count_params(teacher)
    budget = sc.target_params * teacher_params if sc.target_params <= 1 else sc.target_params
    cands = candidates(sc, base, layers_for, budget)
    train_rows, held_rows = feats[: -sc.probe_eval_rows], feats[-sc.probe_eval_rows:]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_rows), generator=g).tolist()
    while len(order) < sc.probe_steps * batch_size:
        order += order
    device = next(teacher.parameters()).device

    def batch_of(rows: list[dict]) -> dict:
        b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in collate(rows, pad_id).items()}
        return {**b, "feats": rows, "pad": pad_id}

    batches = [batch_of([train_rows[j] for j in order[i * batch_size: (i + 1) * batch_size]])
               for i in range(sc.probe_steps)]
    held = [batch_of(held_rows[i: i + batch_size]) for i in range(0, len(held_rows), batch_size)]
    fused = supports_hidden(teacher)
    signals = [_signal(teacher, b, vocab, True) if fused else (None, None) for b in batches]
    held_hidden = [_signal(teacher, b, vocab, True)[0] for b in held] if fused else None
    say(f"cut search: {len(cands)} candidates at {int(budget):,} parameters ({budget / teacher_params:.0%} of the "
        f"teacher), {sc.probe_steps} probe steps each, scored on {len(held_rows)} held-out training rows")
    total = num_layers(base)
    table = []
    for c in cands:
        layers = layers_for(c.num_layers)
        plan = width_plan(base, wscores, layers, c.width) if c.width else {}
        student = build_cut(base, layers, plan)
        for p in student.parameters():
            p.requires_grad_(True)
        result = probe(student, teacher, batches, signals, held, held_hidden, vocab, lr)
        row = {"kind": c.kind(total), "num_layers": c.num_layers, "width": c.width, "params": c.params,
               "share": round(c.params / teacher_params, 4), **result}
        table.append(row)
        say(f"cut search: {c.label()}: {c.params:,} parameters, held-out KL {result['kl_before']:.3f} -> "
            f"{result['kl_after']:.3f} after {sc.probe_steps} steps ({result['seconds']:.0f} s)")
        del student
    best = min(range(len(table)), key=lambda i: table[i]["kl_after"])
    c = cands[best]
    layers = layers_for(c.num_layers)
    plan = width_plan(base, wscores, layers, c.width) if c.width else {}
    say(f"cut search: kept {c.label()} (lowest held-out KL)")
    entry = {"target_params": int(budget), "teacher_params": teacher_params, "probe_steps": sc.probe_steps,
             "probe_eval_rows": len(held_rows), "candidates": table, "chosen": best}
    return layers, plan, entry
