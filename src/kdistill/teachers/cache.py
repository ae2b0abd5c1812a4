"""A teacher read from an offline top-k cache (``kdistill cache-teacher``): no model is run."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from kdistill.data import IGNORE_INDEX
from kdistill.evaluate import eval_fingerprint
from kdistill.losses import TopK
from kdistill.store import read_json
from kdistill.teachers.base import HeldOut, Teacher, TeacherSignal, placeholder_topk, register_teacher
from kdistill.topk_cache import TEACHER_EVAL_FILE, CacheError, TopKCache, check_cache


@register_teacher
class CachedTeacher(Teacher):
    """Serves the cached top-k log-probs of the rows in a batch, aligned with ``batch["labels"]``.

    Args:
        cache: an open :class:`~kdistill.topk_cache.TopKCache` (or its folder).
        vocab_size: the run's shared vocabulary size (cached ids must be below it).
        name: shown in reports.

    Use :meth:`open` to also check the cache against the run (tokenizer, vocabulary, rows).
    """

    name_of_kind = "cache"
    kind = "cache"
    offers = frozenset({"distribution"})
    priority = 20
    packs = True  # serves packed batches (rows found by their segments)
    can_fuse = True  # a top-k signal works with the student's fused (hidden-state) loss path
    what = "an offline teacher cache"

    def __init__(self, cache, vocab_size: int, name: Optional[str] = None):
        self.cache = cache if isinstance(cache, TopKCache) else TopKCache(cache)
        self.vocab_size = vocab_size
        self.top_k = self.cache.top_k
        self.name = name or f"cache:{self.cache.path} ({self.cache.teacher})"

    @classmethod
    def open(cls, path, tokenizer, vocab_size: int, features: Iterable[dict], key: str = "teacher.cache") -> "CachedTeacher":
        """Open ``path`` and refuse it unless it matches ``tokenizer``, ``vocab_size`` and every row
        of ``features`` (ids present, same tokens); raises :class:`~kdistill.topk_cache.CacheError`."""
        cache = TopKCache(path)
        check_cache(cache, tokenizer, vocab_size, features, key)
        return cls(cache, vocab_size)

    @classmethod
    def accepts(cls, spec) -> bool:
        return spec.cache is not None

    @classmethod
    def build(cls, spec, key: str, env) -> "CachedTeacher":
        t = cls.open(spec.cache, env.tokenizer, env.vocab_size, env.features, key=f"{key}.cache")
        t.key = key
        t.name = f"{t.cache.teacher} (cache)"
        env.say(f"{key}: top-{t.top_k} cache {spec.cache} ({len(t.cache):,} rows, "
                f"{t.cache.bytes_per_token():.0f} bytes/token) checked against {len(env.features)} training rows")
        return t

    def refuse(self, need: str, method: str, hint: str = "") -> str:
        if need == "any_sequence":
            return (f"{self.key}.cache: a teacher cache holds the teacher's signal on the dataset's own sequences; "
                    f"method {method} trains on other sequences (use {self.key}.model" + (f", or {hint}" if hint else "")
                    + ")")
        return super().refuse(need, method, hint)

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        """``TeacherSignal(topk=TopK(indices [batch, seq, k] long, logprobs [batch, seq, k] float32))``.

        Positions with label -100 hold placeholder values (ids 0..k-1, uniform log-probs); the
        losses never read them.
        """
        labels = batch["labels"]
        ids = batch.get("ids")
        if ids is None or any(i is None for i in ids):
            raise CacheError(
                "a cached teacher serves only the dataset's own rows (batch['ids'], kept by collate); this batch has none"
            )
        B, S = labels.shape
        indices, logprobs = placeholder_topk(B, S, self.top_k)
        keep = (labels != IGNORE_INDEX).cpu()
        segments = batch.get("segments")  # a packed batch: (row, start, length) of each sample id
        for b, sid in enumerate(ids):
            if sid not in self.cache:
                raise CacheError(f"row {sid!r} is not in the teacher cache {self.cache.path}")
            idx, lp = self.cache.get(sid)
            row, a, n = segments[b].tolist() if segments is not None else (b, 0, S)
            pos = keep[row, a : a + n].nonzero().squeeze(-1) + a
            b = row
            if pos.numel() != idx.shape[0]:
                raise CacheError(
                    f"row {sid!r} has {pos.numel()} trained tokens but {idx.shape[0]} are cached: a cache only serves "
                    "the dataset's own sequences, tokenized as when it was made"
                )
            indices[b, pos] = torch.from_numpy(idx)
            logprobs[b, pos] = torch.from_numpy(lp)
        dev = labels.device
        return TeacherSignal(topk=TopK(indices.to(dev), logprobs.to(dev)))

    def stored_figures(self, ho: HeldOut) -> Optional[dict]:
        """What ``cache-teacher`` measured on these very held-out rows and settings, or None."""
        path = Path(self.cache.path) / TEACHER_EVAL_FILE
        saved = read_json(path)
        if isinstance(saved, dict) and saved.get("fingerprint") == eval_fingerprint(ho.cfg, ho.rows):
            return {"metrics": saved["metrics"], "outputs": saved.get("outputs", []), "params": saved.get("params"),
                    "from": str(path)}
        return None

    def heldout(self, ho: HeldOut) -> dict:
        """The teacher's figures that ``kdistill cache-teacher`` stored beside the cache, when they were
        made for these held-out rows and eval settings; otherwise none (and no retention)."""
        got = self.stored_figures(ho)
        if got is not None:
            ho.say(f"teacher figures: from {got['from']} (measured by cache-teacher on these held-out rows)")
            return got
        ho.say("teacher figures: none (the teacher is only a cache, and no cache holds figures for these held-out rows "
               "and eval settings: run `kdistill cache-teacher` with this data.eval / eval: section to get retention)")
        return {"metrics": {}, "outputs": []}

    def unavailable(self, figures: dict) -> dict:
        why = "trained from an offline teacher cache without teacher.model"
        out = {"kl_to_teacher": why, "top1_agreement": why}
        if not figures.get("metrics"):
            why += " (and the cache holds no teacher figures for these held-out rows)"
            out.update({"teacher metrics": why, "retention": why})
        return out

    def describe(self) -> dict:
        return {"name": self.name, "params": None, "kind": self.kind}

