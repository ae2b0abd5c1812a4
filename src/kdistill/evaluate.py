"""Held-out metrics, generation, speed, and retention.

Metrics of a model on held-out rows (response tokens only):

* ``perplexity``      exp(mean token cross-entropy) on the reference responses (lower is better)
* ``kl_to_teacher``   mean per-token KL(teacher ‖ model) at T = 1 (0 for the teacher itself)
* ``top1_agreement``  share of response positions where the model's argmax = the teacher's
* ``accuracy``        share of rows whose greedy answer matches ``reference`` (rows that have one)
* ``bits_per_byte``   the responses' cross-entropy in bits per UTF-8 byte of their text: the same
                      yardstick whatever the tokenizer (teacher and student comparable across
                      tokenizers; the end-of-turn tokens each model's rendering adds are included)

Retention is each metric as a student/teacher ratio oriented so 1.0 means parity:
``accuracy_s / accuracy_t``, ``perplexity_t / perplexity_s``, ``bits_per_byte_t / bits_per_byte_s``,
``top1_agreement_s / 1`` and
``exp(−kl_to_teacher_s)`` (the teacher's KL to itself is 0, i.e. exp(0) = 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX, Example, Renderer, collate
from kdistill.losses import divergence
from kdistill.models import final_hidden, load_saved, save_model, supports_hidden
from kdistill.sampling import sample_texts
from kdistill.store import on_main, read_json, write_json

HIGHER_IS_BETTER = {"accuracy": True, "top1_agreement": True, "perplexity": False, "kl_to_teacher": False,
                    "bits_per_byte": False}


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
    response_bytes: Optional[int] = None,
) -> dict:
    """Perplexity, and (with ``teacher``) KL to the teacher and top-1 agreement, on ``features``;
    with ``response_bytes`` (the UTF-8 bytes of the responses) also bits per byte.

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
    if response_bytes:
        out["bits_per_byte"] = nll / math.log(2.0) / response_bytes
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
    tokens, refs, n_bytes = {}, {}, {}
    for t in names:
        sub_rows = [e for e in rows if e.extra.get("task") == t]
        sub_feats = [f for f in feats if task_of_id.get(f["id"]) == t]
        ev = measure(sub_rows, sub_feats)
        per[t] = ev["metrics"]
        with_ref = [e for e in sub_rows if e.reference is not None]
        outs.update({e.id: o for e, o in zip(with_ref, ev.get("outputs") or [])})
        tokens[t] = sum(sum(1 for l in f["labels"] if l != IGNORE_INDEX) for f in sub_feats)
        n_bytes[t] = response_bytes(sub_rows, sub_feats)
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
                             ("top1_agreement", tokens, False), ("accuracy", refs, False),
                             ("bits_per_byte", n_bytes, False)):
        v = mean(key, weight, log)
        if v is not None:
            overall[key] = round(v, 6)
    outputs = [outs[e.id] for e in rows if e.reference is not None and e.id in outs]
    return {"metrics": overall, "outputs": outputs, "tasks": per}


def response_bytes(rows: list, feats: list[dict]) -> int:
    """UTF-8 bytes of the assistant turns of the rows that have a feature (what bits per byte divides by)."""
    by_id = {e.id: e for e in rows}
    total = 0
    for f in feats:
        e = by_id.get(f.get("id"))
        if e is not None:
            total += sum(len(m["content"].encode("utf-8")) for m in e.conversation() if m["role"] == "assistant")
    return total


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def normalize_answer(text: str) -> str:
    """Case, punctuation and whitespace folded: ``" Freya."`` -> ``"freya"`` (the strict modes compare these)."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


MATCH_MODES = ("contains", "exact", "regex", "first_line", "judge")


def matches(output: str, reference: str, how: str = "contains", pattern: Optional[str] = None) -> bool:
    """Whether a generated answer counts as correct against ``reference``.

    * ``contains``: the reference appears in the output as whole words (case-insensitive) — lenient:
      an answer that repeats the whole question passes;
    * ``exact``: the whole output equals the reference after :func:`normalize_answer`;
    * ``first_line``: the first non-empty line of the output equals it (text after it is ignored);
    * ``regex``: ``pattern`` is searched in the output and its first group (else the whole match)
      equals it; no match = wrong (lm-eval's regex filter + exact match);
    * ``judge`` needs a model: see :func:`task_accuracy`'s ``judge``.
    """
    if how == "judge":
        raise ValueError("eval.match: judge is scored by a judge model, not by text comparison")
    if how in ("exact", "first_line", "regex"):
        ref = normalize_answer(reference)
        if how == "first_line":
            output = next((line for line in output.splitlines() if line.strip()), "")
        elif how == "regex":
            m = re.search(pattern or "", output)
            if m is None:
                return False
            output = m.group(1) if m.groups() and m.group(1) is not None else m.group(0)
        return bool(ref) and normalize_answer(output) == ref
    out, ref = _norm(output), _norm(reference)
    if not ref:
        return False
    return re.search(r"(?<!\w)" + re.escape(ref) + r"(?!\w)", out) is not None


def _score(rows: list[Example], outputs: list[str], ecfg, judge) -> list[bool]:
    """Each output scored against its row's reference as ``ecfg.match`` says (``judge``: a callable
    ``(rows, outputs) -> [bool]``, e.g. the teacher asked whether each answer is correct)."""
    if ecfg.match == "judge":
        if judge is None:
            raise ValueError("eval.match: judge needs a judge (the teacher model, or eval.judge.api)")
        return [bool(v) for v in judge(rows, outputs)]
    return [matches(o, e.reference, ecfg.match, getattr(ecfg, "answer_regex", None)) for o, e in zip(outputs, rows)]


def task_accuracy(
    model, tokenizer, renderer: Renderer, examples: list[Example], max_new_tokens: int, batch_size: int, how,
    judge=None,
) -> tuple[Optional[float], list[str]]:
    """Greedy answers to rows with a ``reference``; accuracy (None when no row has one) and outputs.
    ``how``: the ``eval`` section (or a mode name of :func:`matches`)."""
    rows = [e for e in examples if e.reference is not None]
    if not rows:
        return None, []
    outputs = sample_texts(model, tokenizer, [renderer.prompt_ids(e) for e in rows], max_new_tokens, batch_size)
    stop = getattr(renderer, "end_of_turn", None)  # a template-less model whose answers end with this text
    if stop:
        outputs = [o.split(stop)[0] for o in outputs]
    ecfg = how if hasattr(how, "match") else _Mode(how)
    return sum(_score(rows, outputs, ecfg, judge)) / len(rows), outputs


def scored_answers(examples: list[Example], how, judge=None) -> tuple[Optional[float], list[str]]:
    """Accuracy of answers already written in the rows (``response``) against ``reference``, in the
    same form as :func:`task_accuracy` (rows without a reference or a response are left out)."""
    rows = [e for e in examples if e.reference is not None and e.response is not None]
    if not rows:
        return None, []
    outputs = [e.response for e in rows]
    ecfg = how if hasattr(how, "match") else _Mode(how)
    return sum(_score(rows, outputs, ecfg, judge)) / len(rows), outputs


class _Mode:
    """A bare mode name where an ``eval`` section is expected."""

    def __init__(self, match: str, answer_regex: Optional[str] = None):
        self.match, self.answer_regex = match, answer_regex


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
    sample_texts(model, tokenizer, prompts[:1], 2, len(prompts), device=device)  # warm-up
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with _PeakRSS() as rss:
        sample_texts(model, tokenizer, prompts, new_tokens, len(prompts), min_new_tokens=new_tokens, device=device)
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
        elif key in ("perplexity", "bits_per_byte") and t:
            out[key] = t / s if s > 0 else None
        elif key == "accuracy" and t:
            out[key] = s / t
    return {k: (round(v, 4) if v is not None else None) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# one model's held-out figures, and keeping the best student


def heldout_figures(model: nn.Module, tokenizer, renderer: Renderer, rows: list[Example], feats: list[dict], ecfg,
                    vocab_size: int, teacher: Optional[nn.Module] = None, is_teacher: bool = False,
                    device=None, judge=None) -> dict:
    """Held-out logit metrics and task accuracy of one model (its outputs kept for the samples); per
    task too when the rows come from several ``data.tasks``.

    ``teacher``: the teacher model to measure KL and top-1 agreement against (same tokenizer), or
    None. ``is_teacher``: the model *is* the teacher (KL 0, agreement 1; with
    ``eval.teacher_answers: data`` its answers are the rows' responses, not generated again).
    ``judge``: for ``eval.match: judge``, ``(rows, answers) -> [bool]``.
    """

    def measure(sub_rows, sub_feats) -> dict:
        metrics = logit_metrics(model, sub_feats, tokenizer.pad_token_id, vocab_size, teacher=teacher,
                                batch_size=ecfg.batch_size, device=device,
                                response_bytes=response_bytes(sub_rows, sub_feats))
        if is_teacher:
            metrics["kl_to_teacher"] = 0.0
            metrics["top1_agreement"] = 1.0
        outputs: list[str] = []
        if ecfg.generate and is_teacher and ecfg.teacher_answers == "data":
            acc, outputs = scored_answers(sub_rows, ecfg, judge)
        elif ecfg.generate:
            acc, outputs = task_accuracy(model, tokenizer, renderer, sub_rows, ecfg.max_new_tokens, ecfg.batch_size,
                                         ecfg, judge)
        else:
            acc = None
        if acc is not None:
            metrics["accuracy"] = acc
        return {"metrics": {k: round(v, 6) for k, v in metrics.items()}, "outputs": outputs}

    return by_task(rows, feats, measure)


def eval_fingerprint(cfg, eval_rows: list[Example]) -> str:
    """What a model's held-out figures depend on: the rows, how they are rendered, the eval settings."""
    key = {
        "rows": [[e.id, e.messages, e.response, e.reference] for e in eval_rows],
        "data": [cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template],
        "eval": [cfg.eval.generate, cfg.eval.max_new_tokens, cfg.eval.match]
        + ([cfg.eval.answer_regex] if cfg.eval.match == "regex" else []),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BestKeeper:
    """``eval.every``: ``measure(student) -> metrics`` on the held-out rows every N steps; with
    ``eval.select_best``, the best student so far is saved in ``OUTPUT/best/`` (and ``best.json``;
    a resumed run keeps it). Shared by every single-pass method (the trainer's ``evaluator``)."""

    def __init__(self, metric: Optional[str], measure: Callable[[Any], dict], out: Path, say: Callable[[str], None],
                 fresh: bool):
        self.measure, self.out, self.say, self.metric = measure, Path(out), say, metric
        if fresh:  # a fresh run: forget a previous run's best
            on_main(lambda: (self.out / "best.json").unlink(missing_ok=True))

    def best(self) -> Optional[dict]:
        return read_json(self.out / "best.json")

    def __call__(self, step: int, wrapper) -> dict:
        student = getattr(wrapper, "model", wrapper)
        metrics = self.measure(student)
        value = metrics.get(self.metric) if self.metric else None
        if value is None:
            return metrics
        best = self.best()
        higher = HIGHER_IS_BETTER.get(self.metric, True)
        if best is None or (value > best["value"] if higher else value < best["value"]):
            save_model(student, self.out / "best")
            write_json(self.out / "best.json", {"step": step, "metric": self.metric, "value": value})
        return metrics

    def select(self, student, training: dict):
        """After training: the best student (``eval.select_best``) instead of the last one, recorded in
        ``training["selected"]``; the last student when there is no selection."""
        best = self.best() if self.metric else None
        if best is None:
            return student
        self.say(f"selected the student of step {best['step']} ({best['metric']} {best['value']}), not the last one "
                 "(eval.select_best)")
        training["selected"] = best
        return load_saved(student, self.out / "best")
