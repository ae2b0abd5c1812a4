"""Held-out metrics, generation, speed, and retention.

Metrics of a model on held-out rows (response tokens only):

* ``perplexity``      exp(mean token cross-entropy) on the reference responses (lower is better)
* ``kl_to_teacher``   mean per-token KL(teacher ‖ model) at T = 1 (0 for the teacher itself)
* ``top1_agreement``  share of response positions where the model's argmax = the teacher's
* ``accuracy``        share of rows whose greedy answer matches ``reference`` (rows that have one)

Retention is each metric as a student/teacher ratio oriented so 1.0 means parity:
``accuracy_s / accuracy_t``, ``perplexity_t / perplexity_s``, ``top1_agreement_s / 1`` and
``exp(−kl_to_teacher_s)`` (the teacher's KL to itself is 0, i.e. exp(0) = 1).
"""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX, Example, Renderer, collate
from kdistill.generation import eos_ids, hf_model, sample_completions
from kdistill.losses import divergence
from kdistill.teachers.local import final_hidden, supports_hidden

HIGHER_IS_BETTER = {"accuracy": True, "top1_agreement": True, "perplexity": False, "kl_to_teacher": False}


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _response_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, vocab_size: int):
    """``(rows, weight)`` at the positions where ``keep`` ``[batch, seq]`` is true.

    When the model's logits are ``hidden @ W.T``: final hidden states ``[n_keep, hidden]`` and the
    output weight ``[vocab, hidden]``, so logits are made chunk by chunk. Otherwise the logits
    ``[n_keep, vocab]`` themselves and None.
    """
    if supports_hidden(model):
        return final_hidden(model, ids, mask)[keep], model.get_output_embeddings().weight[:vocab_size]
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., :vocab_size][keep], None


def _logits(rows: torch.Tensor, weight: Optional[torch.Tensor], sl: slice) -> torch.Tensor:
    return (rows[sl] @ weight.t() if weight is not None else rows[sl]).float()


@torch.no_grad()
def logit_metrics(
    model: nn.Module,
    features: list[dict],
    pad_id: int,
    vocab_size: int,
    teacher: Optional[nn.Module] = None,
    batch_size: int = 8,
    device=None,
    chunk_tokens: int = 1024,
) -> dict:
    """Perplexity, and (with ``teacher``) KL to the teacher and top-1 agreement, on ``features``.

    Both models see the same batches; only positions with a label (response tokens) count, and
    they are projected onto the vocabulary ``chunk_tokens`` at a time.
    """
    device = device or next(model.parameters()).device
    nll = kl = agree = 0.0
    n = 0
    for chunk in _batches(features, batch_size):
        b = collate(chunk, pad_id)
        ids, mask, labels = b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device)
        keep = labels != IGNORE_INDEX
        if not keep.any():
            continue
        targets = labels[keep]
        s_rows, s_w = _response_states(model, ids, mask, keep, vocab_size)
        if teacher is not None:
            t_rows, t_w = _response_states(teacher, ids, mask, keep, vocab_size)
        for i in range(0, targets.numel(), chunk_tokens):
            sl = slice(i, i + chunk_tokens)
            s = _logits(s_rows, s_w, sl)
            s_logp = torch.log_softmax(s, -1)
            nll += float(-s_logp.gather(-1, targets[sl].unsqueeze(-1)).sum())
            if teacher is not None:
                t = _logits(t_rows, t_w, sl)
                kl += float(divergence(torch.log_softmax(t, -1), s_logp, "forward_kl").sum())
                agree += float((t.argmax(-1) == s.argmax(-1)).sum())
        n += int(keep.sum())
    if n == 0:
        return {}
    out = {"perplexity": math.exp(min(nll / n, 700.0))}
    if teacher is not None:
        out["kl_to_teacher"] = kl / n
        out["top1_agreement"] = agree / n
    return out


def by_task(rows: list, feats: list[dict], measure) -> dict:
    """``measure(rows, feats) -> {"metrics", "outputs"}`` per task of ``rows`` (``extra["task"]``),
    aggregated exactly into the overall figures; a single task is measured as it is.

    Overall perplexity is ``exp`` of the token-weighted mean log-perplexity, KL and top-1 agreement
    are token-weighted, accuracy is weighted by the rows that have a reference. Returns
    ``{"metrics", "outputs", "tasks": {name: metrics}}`` (``tasks`` only with two or more tasks);
    ``outputs`` follow ``rows`` (those with a reference), as ``measure`` would give them.
    """
    names = list(dict.fromkeys(e.extra.get("task") for e in rows))
    if len(names) <= 1:
        return measure(rows, feats)
    task_of_id = {e.id: e.extra.get("task") for e in rows}
    per, outs = {}, {}
    tokens, refs = {}, {}
    for t in names:
        sub_rows = [e for e in rows if e.extra.get("task") == t]
        sub_feats = [f for f in feats if task_of_id.get(f["id"]) == t]
        ev = measure(sub_rows, sub_feats)
        per[t] = ev["metrics"]
        with_ref = [e for e in sub_rows if e.reference is not None]
        outs.update({e.id: o for e, o in zip(with_ref, ev.get("outputs") or [])})
        tokens[t] = sum(sum(1 for l in f["labels"] if l != IGNORE_INDEX) for f in sub_feats)
        refs[t] = len(with_ref)

    def mean(key, weight, log=False):
        have = [t for t in names if key in per[t] and weight[t] > 0]
        if not have:
            return None
        w = sum(weight[t] for t in have)
        if log:
            return math.exp(sum(weight[t] * math.log(max(per[t][key], 1e-300)) for t in have) / w)
        return sum(weight[t] * per[t][key] for t in have) / w

    overall = {}
    for key, weight, log in (("perplexity", tokens, True), ("kl_to_teacher", tokens, False),
                             ("top1_agreement", tokens, False), ("accuracy", refs, False)):
        v = mean(key, weight, log)
        if v is not None:
            overall[key] = round(v, 6)
    outputs = [outs[e.id] for e in rows if e.reference is not None and e.id in outs]
    return {"metrics": overall, "outputs": outputs, "tasks": per}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def matches(output: str, reference: str, how: str = "contains") -> bool:
    """``contains``: the reference appears in the output as whole words (case-insensitive);
    ``exact``: equal after trimming, case and whitespace folding."""
    out, ref = _norm(output), _norm(reference)
    if not ref:
        return False
    if how == "exact":
        return out == ref or out.rstrip(".!") == ref.rstrip(".!")
    return re.search(r"(?<!\w)" + re.escape(ref) + r"(?!\w)", out) is not None


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    device=None,
    finish_reasons: Optional[list] = None,
) -> list[str]:
    """Batched generation (greedy unless ``do_sample``); the decoded new text of each prompt.

    ``finish_reasons``: a list to append each row's ``"stop"`` (ended with EOS) or ``"length"`` to.
    """
    comps = sample_completions(model, tokenizer, prompts, max_new_tokens, temperature if do_sample else 0.0,
                               batch_size, device=device, min_new_tokens=min_new_tokens)
    if finish_reasons is not None:
        eos = set(eos_ids(hf_model(model), tokenizer))
        finish_reasons += ["stop" if c and c[-1] in eos else "length" for c in comps]
    return [tokenizer.decode(c, skip_special_tokens=True).strip() for c in comps]


def task_accuracy(
    model, tokenizer, renderer: Renderer, examples: list[Example], max_new_tokens: int, batch_size: int, how: str
) -> tuple[Optional[float], list[str]]:
    """Greedy answers to rows with a ``reference``; accuracy (None when no row has one) and outputs."""
    rows = [e for e in examples if e.reference is not None]
    if not rows:
        return None, []
    outputs = generate(model, tokenizer, [renderer.prompt_ids(e) for e in rows], max_new_tokens, batch_size)
    hits = sum(matches(o, e.reference, how) for o, e in zip(outputs, rows))
    return hits / len(rows), outputs


def scored_answers(examples: list[Example], how: str) -> tuple[Optional[float], list[str]]:
    """Accuracy of answers already written in the rows (``response``) against ``reference``, in the
    same form as :func:`task_accuracy` (rows without a reference or a response are left out)."""
    rows = [e for e in examples if e.reference is not None and e.response is not None]
    if not rows:
        return None, []
    outputs = [e.response for e in rows]
    return sum(matches(o, e.reference, how) for o, e in zip(outputs, rows)) / len(rows), outputs


class _PeakRSS:
    """Samples this process's resident memory in a thread (CPU peak-memory measurement)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *a):
        self._stop.set()
        self.thread.join()
        return False


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measure_speed(model: nn.Module, tokenizer, prompts: list[list[int]], new_tokens: int, device=None) -> dict:
    """Greedy generation throughput and peak memory for one batch of prompts.

    ``tokens_per_s``: generated tokens / wall time (exactly ``new_tokens`` per prompt, after one
    warm-up call). ``peak_memory_mb``: on CUDA, peak allocated memory during generation; on CPU,
    the weights' size plus the peak growth of the process's resident memory while generating.
    """
    if not prompts:
        return {}
    device = device or next(model.parameters()).device
    generate(model, tokenizer, prompts[:1], 2, len(prompts), device=device)  # warm-up
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with _PeakRSS() as rss:
        generate(model, tokenizer, prompts, new_tokens, len(prompts), min_new_tokens=new_tokens, device=device)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base + param_bytes(model)
    else:
        peak = param_bytes(model) + max(0, rss.peak - rss.start)
    return {
        "tokens_per_s": round(len(prompts) * new_tokens / dt, 2),
        "peak_memory_mb": round(peak / 2**20, 1),
        "batch": len(prompts),
        "new_tokens": new_tokens,
    }


def retention(student: dict, teacher: dict) -> dict:
    """Each metric as a ratio oriented so 1.0 = parity with the teacher (see module docstring)."""
    out = {}
    for key, s in student.items():
        t = teacher.get(key)
        if s is None:
            continue
        if key == "kl_to_teacher":
            out[key] = math.exp(-s)
        elif key == "top1_agreement":
            out[key] = s
        elif key == "perplexity" and t:
            out[key] = t / s if s > 0 else None
        elif key == "accuracy" and t:
            out[key] = s / t
    return {k: (round(v, 4) if v is not None else None) for k, v in out.items()}
