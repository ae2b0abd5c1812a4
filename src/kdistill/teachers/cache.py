"""A teacher read from an offline top-k cache (``kdistill cache-teacher``): no model is run."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from kdistill.cache import CacheError, TopKCache, check_cache
from kdistill.data import IGNORE_INDEX
from kdistill.losses import TopK
from kdistill.teachers.local import TeacherSignal


class CachedTeacher:
    """Serves the cached top-k log-probs of the rows in a batch, aligned with ``batch["labels"]``.

    Args:
        cache: an open :class:`~kdistill.cache.TopKCache` (or its folder).
        vocab_size: the run's shared vocabulary size (cached ids must be below it).
        name: shown in reports.

    Use :meth:`open` to also check the cache against the run (tokenizer, vocabulary, rows).
    """

    can_fuse = True  # a top-k signal works with the student's fused (hidden-state) loss path

    def __init__(self, cache, vocab_size: int, name: Optional[str] = None):
        self.cache = cache if isinstance(cache, TopKCache) else TopKCache(cache)
        self.vocab_size = vocab_size
        self.top_k = self.cache.top_k
        self.name = name or f"cache:{self.cache.path} ({self.cache.teacher})"

    @classmethod
    def open(cls, path, tokenizer, vocab_size: int, features: Iterable[dict], key: str = "teacher.cache") -> "CachedTeacher":
        """Open ``path`` and refuse it unless it matches ``tokenizer``, ``vocab_size`` and every row
        of ``features`` (ids present, same tokens); raises :class:`~kdistill.cache.CacheError`."""
        cache = TopKCache(path)
        check_cache(cache, tokenizer, vocab_size, features, key)
        return cls(cache, vocab_size)

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True) -> TeacherSignal:
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
        k = self.top_k
        indices = torch.arange(k, dtype=torch.long).expand(B, S, k).clone()
        logprobs = torch.full((B, S, k), -torch.log(torch.tensor(float(k))).item(), dtype=torch.float32)
        keep = (labels != IGNORE_INDEX).cpu()
        for b, sid in enumerate(ids):
            if sid not in self.cache:
                raise CacheError(f"row {sid!r} is not in the teacher cache {self.cache.path}")
            idx, lp = self.cache.get(sid)
            pos = keep[b].nonzero().squeeze(-1)
            if pos.numel() != idx.shape[0]:
                raise CacheError(
                    f"row {sid!r} has {pos.numel()} trained tokens but {idx.shape[0]} are cached: a cache only serves "
                    "the dataset's own sequences, tokenized as when it was made"
                )
            indices[b, pos] = torch.from_numpy(idx)
            logprobs[b, pos] = torch.from_numpy(lp)
        dev = labels.device
        return TeacherSignal(topk=TopK(indices.to(dev), logprobs.to(dev)))
