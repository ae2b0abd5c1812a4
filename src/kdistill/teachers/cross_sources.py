"""Where a cross-tokenizer teacher's numbers come from: a live model, or an offline cache.

Both give, for the rows of a student batch, the teacher's :class:`~kdistill.alignment.Answer`\\ s
(its tokens of each answer: where each ends, which ends the turn) and then its log-probs before
each span and of each span's later tokens (:meth:`LiveSource.logprobs`). Positions are *teacher
input positions*: the label index of a token at position ``p`` is ``p − 1``.

A cross-tokenizer cache (``kdistill cache-teacher`` with ``loss.cross_tokenizer``) stores, beside
each cached position's top-k, the teacher's tokenization of the answers (:func:`cache_arrays`):
``x_token`` (the token predicted there), ``x_label_lp`` (its log-probability, exact even when it is
outside the top-k), ``x_end`` (where it ends in the answer's text; -1 mid-character, -2 the end of
turn, -3 not part of an answer) and ``x_turn`` (which answer). Training then aligns from these
arrays; the teacher's tokenizer (saved in the cache folder) only checks that the rows did not change
and names the vocabulary for ``gold``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from kdistill.alignment import Answer, TurnRenderer, encode_aligned
from kdistill.data import IGNORE_INDEX, collate
from kdistill.errors import DataError
from kdistill.models import final_hidden, supports_hidden
from kdistill.topk_cache import CacheError, TopKCache, token_hash

__all__ = ["CachedSource", "LiveSource", "cache_arrays", "teacher_renderer", "topk_with_labels"]

_MID, _EOT, _OTHER = -1, -2, -3


def teacher_renderer(cfg, tok, spec) -> TurnRenderer:
    """How the teacher ``spec`` renders rows: its own chat template, or plain text ending with its
    ``end_of_turn``; room for 4x the student's ``data.max_length`` (another tokenizer may need more)."""
    return TurnRenderer(tok, 4 * cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template,
                        getattr(spec, "end_of_turn", None))


def _chunked(rows_logits, rows: list[int], chunk: int = 256) -> torch.Tensor:
    """``log_softmax(rows_logits(rows[a:b]))`` chunk by chunk -> ``[len(rows), V]``."""
    parts = [torch.log_softmax(rows_logits(rows[a:a + chunk]), -1) for a in range(0, len(rows), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _topk_full(idx: torch.Tensor, lp: torch.Tensor, V: int) -> torch.Tensor:
    """Full log-probs ``[N, V]`` from a top-k ``[N, k]``: the cached tokens' values, the rest mass
    spread evenly over the other tokens (its shape is unknown)."""
    k = idx.shape[-1]
    lp = lp.float()
    rest = torch.clamp(1.0 - lp.exp().sum(-1), min=0.0)
    fill = torch.log(rest / max(V - k, 1)) if V > k else torch.full_like(rest, -math.inf)
    return fill.unsqueeze(-1).expand(idx.shape[0], V).clone().scatter_(-1, idx.long(), lp)


def _span_logc(cont_lp: torch.Tensor, cont: list[tuple], n: int) -> torch.Tensor:
    t_logc = torch.zeros(n, dtype=torch.float32)
    if cont:
        t_logc.index_add_(0, torch.tensor([c[-1] for c in cont], dtype=torch.long), cont_lp.float().cpu())
    return t_logc


class LiveSource:
    """A teacher model next to the student (``inner``: a :class:`~kdistill.teachers.local.LocalTeacher`
    with the teacher's vocabulary), reading rows rendered by ``renderer``."""

    def __init__(self, inner, renderer, eot, device=None):
        self.inner, self.renderer, self.eot, self.device = inner, renderer, eot, device
        self.vocab_size = inner.vocab_size
        self._rows: dict = {}

    def row(self, ex, response: Optional[str] = None) -> dict:
        """The teacher's feature of ``ex`` (with ``answers``), optionally with another response."""
        if response is not None:
            return encode_aligned(self.renderer, ex, self.eot, response=response)
        if ex.id not in self._rows:
            self._rows[ex.id] = encode_aligned(self.renderer, ex, self.eot)
        return self._rows[ex.id]

    @torch.no_grad()
    def logprobs(self, rows: list[dict], first: list[tuple[int, int]], cont: list[tuple[int, int, int]]):
        """``(log-probs [n, V] before each span, first token [n], log-prob [n] of the later tokens)``
        for spans starting at ``first`` = ``(row, teacher position)``; ``cont`` = ``(row, position, span)``."""
        pad = self.renderer.tok.pad_token_id
        batch = collate([{"input_ids": f["input_ids"], "labels": f["labels"], "id": f["id"]} for f in rows], pad)
        dev = self.device or torch.device("cpu")
        batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        S = batch["input_ids"].shape[1]
        ids = batch["input_ids"].reshape(-1)
        V = self.vocab_size
        model = self.inner.model
        if supports_hidden(model):
            h = final_hidden(model, batch["input_ids"], batch["attention_mask"])
            h = h.reshape(-1, h.shape[-1])
            w = model.get_output_embeddings().weight[:V]
            rows_logits = lambda r: (h[r].to(w.dtype) @ w.t()).float()  # noqa: E731
        else:
            lg = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            lg = lg.reshape(-1, lg.shape[-1])
            rows_logits = lambda r: lg[r, :V].float()  # noqa: E731
        f_rows = [b * S + p - 1 for b, p in first]
        c_rows = [b * S + p - 1 for b, p, _ in cont]
        t_logp = _chunked(rows_logits, f_rows)
        t_token = ids[torch.tensor([r + 1 for r in f_rows], dtype=torch.long, device=ids.device)].cpu()
        cont_lp = torch.zeros(0)
        if cont:
            tok = ids[torch.tensor([r + 1 for r in c_rows], dtype=torch.long, device=ids.device)]
            cont_lp = _chunked(rows_logits, c_rows).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        return t_logp, t_token, _span_logc(cont_lp, cont, len(first))


class CachedSource:
    """A cross-tokenizer teacher cache (see the module docstring): ``renderer`` (with the teacher
    tokenizer saved in the cache) renders rows only to check they are the ones cached."""

    def __init__(self, cache: TopKCache, renderer, eot, key: str = "teacher.cache"):
        self.cache, self.renderer, self.eot, self.key = cache, renderer, eot, key
        self.vocab_size = cache.vocab_size
        self._rows: dict = {}

    def row(self, ex, response: Optional[str] = None) -> dict:
        if response is not None:
            raise DataError(f"{self.key}: a teacher cache holds only the dataset's own answers")
        if ex.id in self._rows:
            return self._rows[ex.id]
        if ex.id not in self.cache:
            raise CacheError(f"{self.key}: row {ex.id!r} is not in the teacher cache {self.cache.path}; run "
                             "`kdistill cache-teacher` on this data.train")
        if self.cache.token_hash(ex.id) != token_hash(encode_aligned(self.renderer, ex, self.eot)):
            raise CacheError(f"{self.key}: row {ex.id!r} renders differently than when it was cached (its text or the "
                             "data settings changed); rerun `kdistill cache-teacher`")
        x = self.cache.extra(ex.id)
        if "end" not in x:
            raise CacheError(f"{self.key}: {self.cache.path} holds no teacher tokenization (made without "
                             "loss.cross_tokenizer); rerun `kdistill cache-teacher` with loss.cross_tokenizer")
        answers: dict[int, Answer] = {}
        for j, (end, turn) in enumerate(zip(x["end"].tolist(), x["turn"].tolist())):
            if end == _OTHER:
                continue
            a = answers.setdefault(turn, Answer())
            if end == _EOT:
                a.eot = a.eot if a.eot is not None else j + 1
            else:
                a.positions.append(j + 1)  # label index j <-> position j + 1
                a.ends.append(end if end >= 0 else None)
        self._rows[ex.id] = row = {"id": ex.id, "answers": [answers[t] for t in sorted(answers)]}
        return row

    def logprobs(self, rows: list[dict], first: list[tuple[int, int]], cont: list[tuple[int, int, int]]):
        got = {}
        for b, r in enumerate(rows):
            idx, lp = self.cache.get(r["id"])
            got[b] = (idx, lp, self.cache.extra(r["id"]))
        V = self.vocab_size
        if first:
            idx = torch.from_numpy(np.stack([got[b][0][p - 1] for b, p in first]))
            lp = torch.from_numpy(np.stack([got[b][1][p - 1] for b, p in first]))
            t_logp = _topk_full(idx, lp, V)
        else:
            t_logp = torch.zeros(0, V)
        t_token = torch.tensor([int(got[b][2]["token"][p - 1]) for b, p in first], dtype=torch.long)
        cont_lp = torch.tensor([float(got[b][2]["label_lp"][p - 1]) for b, p, _ in cont], dtype=torch.float32)
        return t_logp, t_token, _span_logc(cont_lp, cont, len(first))


# ---------------------------------------------------------------------------------------------
# writing a cross-tokenizer cache


@torch.no_grad()
def topk_with_labels(model, batch: dict, vocab_size: int, k: int, chunk: int = 512):
    """``(indices [N, k], logprobs [N, k], label log-prob [N])`` at the labelled positions (row-major)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    keep = labels != IGNORE_INDEX
    if supports_hidden(model):
        h = final_hidden(model, ids, mask)[keep]
        w = model.get_output_embeddings().weight[:vocab_size]
        logits_of = lambda a, b: (h[a:b].to(w.dtype) @ w.t()).float()  # noqa: E731
    else:
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., :vocab_size][keep]
        logits_of = lambda a, b: full[a:b].float()  # noqa: E731
    target = labels[keep]
    out_i, out_l, out_y = [], [], []
    for a in range(0, int(target.numel()), chunk):
        lp = torch.log_softmax(logits_of(a, a + chunk), dim=-1)
        top = lp.topk(k, dim=-1, sorted=True)
        out_i.append(top.indices)
        out_l.append(top.values)
        out_y.append(lp.gather(-1, target[a:a + chunk].unsqueeze(-1)).squeeze(-1))
    if not out_i:
        return torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k)), torch.zeros(0)
    return torch.cat(out_i), torch.cat(out_l), torch.cat(out_y)


def cache_arrays(feats: list[dict], label_lp: np.ndarray) -> dict[str, np.ndarray]:
    """The per-position arrays of a cross-tokenizer cache shard (see the module docstring) for the
    cached positions of ``feats`` (features with ``answers``, in order) and their label log-probs."""
    token, end, turn = [], [], []
    for f in feats:
        where: dict[int, tuple[int, int]] = {}
        for t, a in enumerate(f["answers"]):
            for p, e in zip(a.positions, a.ends):
                where[p] = (t, e if e is not None else _MID)
            if a.eot is not None:
                where[a.eot] = (t, _EOT)
        for p in range(1, len(f["labels"])):
            if f["labels"][p] != IGNORE_INDEX:
                t, e = where.get(p, (-1, _OTHER))
                token.append(f["input_ids"][p])
                end.append(e)
                turn.append(t)
    if len(token) != len(label_lp):  # pragma: no cover - the same positions as the top-k
        raise RuntimeError("cross-tokenizer cache: positions and label log-probs disagree")
    return {"token": np.asarray(token, np.int32), "label_lp": np.asarray(label_lp, np.float32),
            "end": np.asarray(end, np.int32), "turn": np.asarray(turn, np.int16)}
