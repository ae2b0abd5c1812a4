"""A teacher served by vLLM that gives its token distributions over HTTP (``teacher.api.logprobs: k``).

White-box distillation without the teacher's weights on the training machine: for every sequence
the student trains on, ``POST {base_url}/completions`` with the sequence's token ids as the prompt,
``max_tokens: 1`` and ``prompt_logprobs: k``. vLLM answers with ``choices[0].prompt_logprobs``: for
each prompt token j ≥ 1, the top-k of the teacher's distribution over token j given the tokens
before it (plus token j itself when it is not among them), keyed by token id; entry 0 is null.
The batch's position t, whose label is token t+1, takes entry t+1.

The result is the same top-k signal an offline cache gives (:class:`~kdistill.teachers.cache.CachedTeacher`),
so every loss, ``kdistill cache-teacher`` and the multi-teacher mixtures take it unchanged; unlike a
cache it also covers sequences made during training (the student's samples in ``on_policy``).

Requests go through :class:`~kdistill.teachers.api.ApiTeacher` (concurrency, retries, backoff,
secrets kept out of logs); a sequence that still has no log-probs after the retries stops the run
with the server's reason, as training on a partial signal would be silent damage. vLLM refuses
``k`` above its ``--max-logprobs`` (default 20) with HTTP 400: the error says so.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from kdistill.data import IGNORE_INDEX, collate
from kdistill.errors import ConfigError, ModelError
from kdistill.losses import TopK
from kdistill.store import memo_json
from kdistill.teachers.api import ApiError, ApiTeacher, Completion, Job, _Fail, _Retry
from kdistill.teachers.base import HeldOut, Teacher, TeacherSignal, placeholder_topk, register_teacher
from kdistill.teachers.text import ApiTextTeacher, answered_figures

PROBE = "The quick brown fox, 12 + 30 = 42; naïve café. Ünïcödé and\ttabs\n"


class ApiLogprobs(ApiTeacher):
    """``/completions`` with ``prompt_logprobs``: one job per token sequence (``job.extra["prompt"]``).

    A result's ``value`` is ``(indices [n-1, k] int64, logprobs [n-1, k] float32, own [n-1] float32)``
    for a sequence of n tokens: row t is the distribution over token t+1, ``own`` the log-prob of
    token t+1 itself (NaN when the server did not return it).
    """

    def __init__(self, cfg, top_k: int):
        super().__init__(cfg)
        self.url = cfg.base_url.rstrip("/") + "/completions"
        self.top_k = top_k
        self.name = f"api:{cfg.model}"

    def _body(self, job: Job) -> dict:
        body = {"model": self.cfg.model, "prompt": job.extra["prompt"], "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.top_k}
        body.update({k: v for k, v in self.cfg.extra_body.items() if k not in body})
        return body

    def _parse(self, job: Job, resp) -> Completion:
        try:
            choice = resp.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry("malformed response") from None
        entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if entries is None:
            raise ApiError(
                f"teacher.api.logprobs: {self.cfg.base_url} returned no prompt_logprobs; the teacher's token "
                "distributions over HTTP need a vLLM server (`vllm serve MODEL --max-logprobs K`)"
            )
        prompt = job.extra["prompt"]
        if not isinstance(entries, list) or len(entries) != len(prompt):
            raise _Retry("malformed response (prompt_logprobs do not match the prompt)")
        n, k = len(prompt), self.top_k
        idx = np.zeros((max(n - 1, 0), k), np.int64)
        lp = np.zeros((max(n - 1, 0), k), np.float32)
        own = np.full(max(n - 1, 0), np.nan, np.float32)
        try:
            for j in range(1, n):
                cands = [(int(tid), float(v["logprob"] if isinstance(v, dict) else v)) for tid, v in entries[j].items()]
                cands.sort(key=lambda c: -c[1])
                if len(cands) < k:
                    raise _Fail(f"the server returned {len(cands)} log-probs for a position, expected {k}")
                top = cands[:k]
                idx[j - 1] = [c[0] for c in top]
                lp[j - 1] = [c[1] for c in top]
                mine = dict(cands).get(int(prompt[j]))
                if mine is not None:
                    own[j - 1] = mine
        except (AttributeError, KeyError, TypeError, ValueError):
            raise _Retry("malformed response (prompt_logprobs)") from None
        return Completion(text="", finish_reason="stop", value=(idx, lp, own))


@register_teacher
class ServedTeacher(Teacher):
    """The teacher signal from a vLLM server: top-k log-probs at every trained position.

    Args:
        cfg: the ``teacher.api`` section (with ``logprobs``).
        vocab_size: the run's vocabulary (every returned id must be below it).
        name: shown in reports.
    """

    name_of_kind = "served"
    kind = "api"
    offers = frozenset({"distribution", "any_sequence", "text", "judge"})
    priority = 10
    can_fuse = True  # a top-k signal works with the student's fused (hidden-state) loss path
    what = "a teacher served over HTTP (log-probs only)"

    def __init__(self, cfg, vocab_size: int, name: Optional[str] = None, system_prompt: Optional[str] = None):
        self.cfg = cfg
        self.system_prompt = system_prompt
        self._text = None
        self.vocab_size = vocab_size
        self.top_k = min(int(cfg.logprobs), vocab_size)
        self.api = ApiLogprobs(cfg, self.top_k)
        self.name = name or f"api:{cfg.model} @ {cfg.base_url} (top-{self.top_k} log-probs)"
        # every request goes through one worker thread, so a prefetched batch and one asked for now
        # never race; prefetch() queues work there ahead of time
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdistill-served-teacher")
        self._pending: dict[tuple, Future] = {}
        self.prefetched = 0  # batches whose log-probs were asked for ahead of time and then used
        self.prefetches = bool(cfg.prefetch)

    @classmethod
    def accepts(cls, spec) -> bool:
        return spec.api is not None and spec.api.logprobs is not None and spec.model is None and spec.cache is None

    @classmethod
    def build(cls, spec, key: str, env):
        """The served teacher; only its chat side when the method needs just answers and ratings."""
        if not env.needs & {"distribution", "any_sequence"}:
            if not env.needs & {"text", "judge"}:
                raise ConfigError(f"{key}.api.logprobs: a served teacher's log-probs serve methods that train on or "
                                  f"score with the teacher's distributions; method {env.method} cannot use them")
            env.say(f"{key}.api.logprobs is not used by method {env.method}: it needs the teacher's answers and ratings")
            return ApiTextTeacher.build(spec, key, env)
        t = cls(spec.api, env.vocab_size, system_prompt=env.cfg.data.system_prompt)
        t.key = key
        env.say(f"{key}: {t.name}; {t.check_tokenizer(env.tokenizer)}")
        return t

    def check_tokenizer(self, tokenizer) -> str:
        """Compare the server's tokenization of a probe text with ``tokenizer`` (vLLM's ``/tokenize``);
        raises :class:`~kdistill.errors.ModelError` when they differ; returns what was checked."""
        import httpx

        root = self.cfg.base_url.rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else root
        body = {"model": self.cfg.model, "prompt": PROBE, "add_special_tokens": False}
        try:
            resp = httpx.post(root + "/tokenize", json=body, headers=self.api._headers(), timeout=self.cfg.timeout)
        except httpx.HTTPError as exc:
            raise ApiError(f"teacher.api: cannot reach {self.cfg.base_url} ({type(exc).__name__}); is the server "
                           "running and base_url right?") from None
        fatal = self.api._fatal_for_status(resp) if resp.status_code in (401, 403) else None
        if fatal is not None:
            raise fatal
        try:
            served = resp.json()["tokens"] if resp.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            served = None
        if served is None:
            return "tokenizer not checked (the server has no /tokenize endpoint)"
        ours = tokenizer.encode(PROBE, add_special_tokens=False)
        if list(served) != list(ours):
            raise ModelError(
                f"teacher.api: the served model {self.cfg.model!r} tokenizes text differently from the student's "
                f"tokenizer ({len(served)} vs {len(ours)} tokens for a probe text); logit distillation needs one tokenizer "
                "(use method: sequence for a teacher with another tokenizer)"
            )
        return "tokenizer checked against the server's /tokenize"

    def sequence_logprobs(self, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per sequence (in order): ``(indices [n-1, k], logprobs [n-1, k], own [n-1])``; see :class:`ApiLogprobs`.
        Raises :class:`ApiError` when a sequence gets no answer after the retries."""
        out: dict[int, Completion] = {}
        jobs = [Job(i, [], extra={"prompt": [int(t) for t in s]}) for i, s in enumerate(seqs)]
        self.api.run(jobs, lambda job, c: out.__setitem__(job.key, c))
        rows = []
        for i in range(len(seqs)):
            c = out[i]
            if not c.ok:
                hint = (" (vLLM allows at most --max-logprobs log-probs per token, default 20: lower "
                        "teacher.api.logprobs or restart the server with a larger --max-logprobs)"
                        if "logprobs" in (c.error or "") else "")
                raise ApiError(f"teacher.api.logprobs: no log-probs for a sequence of {len(seqs[i])} tokens after "
                               f"{c.attempts} attempts ({c.error}){hint}")
            idx = c.value[0]
            if idx.size and int(idx.max()) >= self.vocab_size:
                raise ModelError(
                    f"teacher.api: the server returned token id {int(idx.max())}, beyond the student's vocabulary "
                    f"({self.vocab_size}); the served model uses another tokenizer"
                )
            rows.append(c.value)
        return rows

    def _trained(self, batch: dict) -> list[tuple[int, torch.Tensor, list[int]]]:
        """``(row, trained positions, tokens to send)`` per row with a label."""
        labels = batch["labels"].cpu()
        ids = batch["input_ids"].cpu()
        todo = []
        for b in range(labels.shape[0]):
            pos = (labels[b] != IGNORE_INDEX).nonzero().squeeze(-1)
            if pos.numel():
                todo.append((b, pos, ids[b, : int(pos.max()) + 2].tolist()))
        return todo

    def _submit(self, seqs: list[list[int]]) -> Future:
        return self._pool.submit(self.sequence_logprobs, seqs)

    def prefetch(self, batch: dict) -> None:
        """Start asking for ``batch``'s log-probs in the background (``teacher.api.prefetch``); a later
        :meth:`signal` for the same sequences takes the answer. Errors surface there."""
        if not self.cfg.prefetch:
            return
        seqs = [s for _, _, s in self._trained(batch)]
        key = tuple(map(tuple, seqs))
        if seqs and key not in self._pending:
            if len(self._pending) >= 64:  # never used (e.g. a batch replaced by samples): forget the oldest
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = self._submit(seqs)

    def _fetch(self, todo: list) -> list:
        seqs = [s for _, _, s in todo]
        fut = self._pending.pop(tuple(map(tuple, seqs)), None)
        if fut is not None:
            self.prefetched += 1
        return (fut or self._submit(seqs)).result()

    @torch.no_grad()
    def topk_at_labels(self, batch: dict, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indices [N, k] long, logprobs [N, k] float32, own [N] float32)`` at the positions with a
        label, in row-major order (as :func:`kdistill.teachers.local.model_topk` gives them)."""
        todo = self._trained(batch)
        got = self._fetch(todo)
        k = self.top_k
        parts_i = [torch.from_numpy(g[0][pos.numpy()]) for (_, pos, _), g in zip(todo, got)]
        parts_l = [torch.from_numpy(g[1][pos.numpy()]) for (_, pos, _), g in zip(todo, got)]
        parts_o = [torch.from_numpy(g[2][pos.numpy()]) for (_, pos, _), g in zip(todo, got)]
        if not parts_i:
            return torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k)), torch.zeros(0)
        return torch.cat(parts_i), torch.cat(parts_l), torch.cat(parts_o)

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        """``TeacherSignal(topk=TopK(indices [batch, seq, k] long, logprobs [batch, seq, k] float32))``;
        positions without a label hold placeholders (ids 0..k-1, uniform) that the losses never read."""
        labels = batch["labels"]
        B, S = labels.shape
        indices, logprobs = placeholder_topk(B, S, self.top_k)
        keep = (labels != IGNORE_INDEX).cpu()
        indices[keep], logprobs[keep], _ = self.topk_at_labels(batch)  # row-major, as boolean indexing is
        dev = labels.device
        return TeacherSignal(topk=TopK(indices.to(dev), logprobs.to(dev)))

    @property
    def text(self):
        """The same server as a text teacher (chat answers, ratings): :class:`~kdistill.teachers.text.ApiTextTeacher`."""
        if self._text is None:
            self._text = ApiTextTeacher(self.cfg, self.system_prompt)
        return self._text

    @property
    def text_if_used(self):
        """The chat side if anything asked for it (its request figures belong in a report), else None."""
        return self._text

    def _own_logprobs(self, features: list[dict], pad_id: int, batch_size: int) -> list[torch.Tensor]:
        """Per row: the teacher's log-prob of each of its trained tokens ``[n_row]`` (NaN where the
        server did not return one)."""
        rows: list[torch.Tensor] = []
        for a in range(0, len(features), batch_size):
            batch = collate(features[a: a + batch_size], pad_id)
            counts = (batch["labels"] != IGNORE_INDEX).sum(-1).tolist()
            rows += list(torch.split(self.topk_at_labels(batch)[2].double(), counts))
        return rows

    def mean_loglik(self, features: list[dict], pad_id: int, batch_size: int = 8) -> list[float]:
        """Per row: the teacher's mean log-likelihood of its trained tokens (e.g. a candidate answer),
        as :func:`kdistill.scoring.loglik_scores` computes it with a local model."""
        own = self._own_logprobs(features, pad_id, batch_size)
        # a token the server gave no log-prob for counts as very unlikely
        return [float(torch.nan_to_num(r, nan=-1e4).mean()) if r.numel() else 0.0 for r in own]

    def perplexity(self, features: list[dict], pad_id: int, batch_size: int = 8) -> Optional[float]:
        """The teacher's perplexity of the trained tokens of ``features`` (token-weighted; None when the
        server returned no log-prob for them)."""
        own = torch.cat(self._own_logprobs(features, pad_id, batch_size) or [torch.zeros(0, dtype=torch.float64)])
        own = own[torch.isfinite(own)]
        return math.exp(-float(own.mean())) if own.numel() else None

    def summary(self) -> dict:
        return {**self.api.summary(), "prefetched_batches": self.prefetched}

    def heldout(self, ho: HeldOut) -> dict:
        """Accuracy from its chat answers, perplexity from its log-probs (kept in ``ho.keep``: a rerun
        does not pay for them again)."""
        return memo_json(ho.keep, lambda: answered_figures(ho, self.cfg, served=self))

    def unavailable(self, figures: dict) -> dict:
        why = "the teacher is served over HTTP (its top-k log-probs train the student; these need its full distribution)"
        return {"kl_to_teacher": why, "top1_agreement": why}

    def describe(self) -> dict:
        return {"name": self.name, "params": None, "kind": self.kind}
