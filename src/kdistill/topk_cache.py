"""Offline teacher signal: the teacher's top-k log-probs per response token, in compact shards.

``kdistill cache-teacher CONFIG`` runs the teacher once over the rows of ``data.train`` (rendered
and tokenized exactly as ``kdistill run`` renders them) and stores, for every position whose label
is not -100 (after :func:`kdistill.data.collate`'s shift), the teacher's ``top_k`` token ids and
log-probs at T = 1. The remaining tail mass is not stored: it is ``1 − Σ top-k`` and the losses
keep it as an explicit "rest" bucket (see :mod:`kdistill.losses`), so what matters is that the
top-k log-probs are stored precisely enough.

Layout of a cache folder::

    manifest.json        format, version, teacher, tokenizer fingerprint, vocab size, top_k,
                         quantization, data settings, and one entry per shard {file, sha256, ...}
    shard-00000.npz      rows keyed by sample id (np.savez_compressed, no pickle)
    ...

A shard holds, for its ``n`` rows and ``T`` cached tokens:

* ``sample_ids`` ``[n]`` bytes (UTF-8), ``token_hash`` ``[n]`` bytes (hash of the row's input ids and
  labels, to detect data changed since caching), ``offsets`` ``[n+1]`` int64 (token ranges);
* ``ids`` ``[B, T, k]`` uint8: token ids as ``B`` little-endian byte planes (B = 2 when the
  vocabulary fits in uint16, 3 up to 2^24, else 4); byte planes compress better than whole ints;
* ``top1`` ``[T]`` float32: the largest log-prob of each position;
* ``log_rest`` ``[T]`` float32: log of the tail mass ``1 − Σ top-k``, computed in float64 from the
  teacher's (float32) top-k log-probs before quantization. Decoding shifts log-probs 2..k by one
  common amount (at most one grid step) so that ``1 − Σ top-k`` is this tail again. The losses
  derive the tail bucket from ``1 − Σ top-k``; for a confident teacher (tail ~1e-6) rounding alone
  would move it by a large factor, and the reverse-KL-like divergences weigh ``log tail`` by the
  student's tail mass. With the correction every divergence from the cache is within ~1e-5
  (relative) of the same loss from the uncompressed top-k (``benchmarks/cache.py`` measures it);
* ``gaps`` ``[2, T, k-1]`` uint8: the other log-probs (sorted, descending) quantized on a grid of
  ``1/scale`` nats below ``top1`` (``q_j = round((top1 − lp_j)·scale)``, non-decreasing in j),
  stored as uint16 differences ``q_j − q_{j−1}`` in two byte planes. Rounding error ≤ 1/(2·scale)
  nats per entry (scale 256: 0.002 nats), never accumulated (it is the grid value that is
  delta-coded). Scale 256 (the default) keeps the loss within ~1e-4 (relative) of the uncompressed
  top-k loss for every divergence and costs ~50 bytes per token after compression.

Writes are crash-safe and resumable (:class:`CacheWriter`): a new cache writes its manifest first;
a shard is written to a temporary file, fsynced and renamed, and the manifest (also tmp + rename) is
updated after it. On a rerun, shards listed in the manifest whose checksum no longer matches are
deleted and recomputed, this writer's own leftovers (an unlisted shard from a crash between the two
renames, temp files) are deleted, and only rows not in a valid shard are computed: none missing,
none twice. A folder that is neither empty nor a cache is never written into.

``kdistill cache-teacher`` (:mod:`kdistill.commands.cache_teacher`) fills a cache from a teacher.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from pydantic import Field

from kdistill.data import IGNORE_INDEX
from kdistill.errors import KDistillError
from kdistill.models.vocab import tokenizer_fingerprint
from kdistill.section import Section
from kdistill.store import LOCK_FILE as LOCK
from kdistill.store import MARK, atomic_write

FORMAT = "kdistill-topk-cache"
VERSION = 1
LOGPROB_SCALE = 256  # grid of log-probs below top-1: 1/256 nats (max rounding error 0.002 nats)
_QMAX = 65535
TEACHER_EVAL_FILE = "teacher_eval.json"  # beside the shards: the teacher's held-out figures (cache-teacher)


class CacheConfig(Section):
    """``kdistill cache-teacher``: the teacher's top-k log-probs on data.train -> sharded, resumable files."""

    path: Optional[str] = Field(None, description="cache folder (default: teacher.cache)")
    top_k: int = Field(64, ge=1, le=4096, description="tokens kept per position (the rest is one tail bucket)")
    shard_size: int = Field(256, ge=1, description="rows per shard (the unit of resumption)")
    batch_size: int = Field(8, ge=1, description="rows per teacher forward pass")
    accept_teacher_change: bool = Field(
        False, description="extend a cache although its served teacher now reports another identity (model root, "
        "max_model_len, version, measured log-prob dtype): the cache then mixes two teachers")


class CacheError(KDistillError):
    """A teacher cache is missing, corrupted, or does not match the data, tokenizer or vocabulary."""


# ---------------------------------------------------------------------------------------------
# codec: top-k ids/log-probs <-> compact arrays


def id_bytes(vocab_size: int) -> int:
    """Bytes per stored token id: 2 up to 65,536 tokens, 3 up to 2^24, else 4."""
    return 2 if vocab_size <= 1 << 16 else 3 if vocab_size <= 1 << 24 else 4


def encode_topk(indices: np.ndarray, logprobs: np.ndarray, vocab_size: int, log_rest: Optional[np.ndarray] = None,
                scale: int = LOGPROB_SCALE) -> dict:
    """Compact arrays for ``T`` positions.

    Args:
        indices: ``[T, k]`` token ids, ``logprobs``: ``[T, k]`` float, each row sorted descending.
        log_rest: ``[T]`` log of the mass outside the top-k (default: ``log(1 − Σ exp(logprobs))``).
    Returns:
        ``{"ids": [B, T, k] uint8, "top1": [T] float32, "gaps": [2, T, k-1] uint8, "log_rest": [T] float32}``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    T, k = indices.shape
    nb = id_bytes(vocab_size)
    ids = indices.astype("<u4").view(np.uint8).reshape(T, k, 4)[..., :nb]
    ids = np.ascontiguousarray(ids.transpose(2, 0, 1))
    top1 = lp[:, 0].astype(np.float32)
    below = top1.astype(np.float64)[:, None] - lp[:, 1:]
    below = np.where(np.isfinite(below), below, np.inf)
    q = np.clip(np.round(below * scale), 0, _QMAX)
    q = np.maximum.accumulate(q, axis=1).astype(np.int64)  # sorted input: already monotone; guard anyway
    d = np.diff(np.concatenate([np.zeros((T, 1), np.int64), q], axis=1), axis=1).astype("<u2")
    gaps = np.ascontiguousarray(d.view(np.uint8).reshape(T, k - 1, 2).transpose(2, 0, 1))
    if log_rest is None:
        with np.errstate(divide="ignore"):
            log_rest = np.log(np.clip(1.0 - np.exp(lp).sum(1), 0.0, None))
    return {"ids": ids, "top1": top1, "gaps": gaps, "log_rest": np.asarray(log_rest, np.float32)}


def decode_topk(ids: np.ndarray, top1: np.ndarray, gaps: np.ndarray, log_rest: Optional[np.ndarray] = None,
                scale: int = LOGPROB_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_topk` (for a slice of positions): ``([T, k] int64, [T, k] float32)``.

    With ``log_rest``, log-probs 2..k are shifted by a common amount so that ``1 − Σ top-k`` is the
    stored tail mass (see the module docstring).
    """
    nb, T, k = ids.shape
    raw = np.zeros((T, k, 4), np.uint8)
    raw[..., :nb] = ids.transpose(1, 2, 0)
    indices = raw.view("<u4").reshape(T, k).astype(np.int64)
    d = np.ascontiguousarray(gaps.transpose(1, 2, 0)).view("<u2").reshape(T, k - 1).astype(np.int64)
    q = np.cumsum(d, axis=1)
    lp64 = np.empty((T, k), np.float64)
    lp64[:, 0] = top1
    lp64[:, 1:] = top1.astype(np.float64)[:, None] - q / scale
    if log_rest is not None and k > 1:
        others = np.exp(lp64[:, 1:]).sum(1)
        want = 1.0 - np.exp(np.asarray(log_rest, np.float64)) - np.exp(lp64[:, 0])
        ok = (want > 0) & (others > 0)
        shift = np.zeros(T)
        shift[ok] = np.log(want[ok] / others[ok])
        # never move an entry by more than the grid (guards against a tail that float32 cannot resolve)
        lp64[:, 1:] += np.clip(shift, -1.0 / scale, 1.0 / scale)[:, None]
    return indices, lp64.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# shards and manifest


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def token_hash(feature: dict) -> str:
    """Hash of a row's token ids and labels (the cache is only valid for exactly these tokens)."""
    h = hashlib.sha1(np.asarray(feature["input_ids"], np.int64).tobytes())
    h.update(np.asarray(feature["labels"], np.int64).tobytes())
    return h.hexdigest()[:16]


def cached_positions(feature: dict) -> int:
    """Tokens cached for a row: positions t with ``labels[t+1] != -100`` (collate's shift)."""
    return sum(1 for l in feature["labels"][1:] if l != IGNORE_INDEX)


def shard_bytes(sample_ids: list[str], hashes: list[str], counts: list[int], indices: np.ndarray,
                logprobs: np.ndarray, vocab_size: int, log_rest: Optional[np.ndarray] = None,
                extra: Optional[dict] = None) -> bytes:
    """Serialize one shard (``indices``/``logprobs`` ``[T, k]``, ``log_rest`` ``[T]``, rows in order);
    ``extra``: more per-position arrays ``{name: [T]}``, stored as ``x_<name>`` beside the top-k
    (e.g. a cross-tokenizer cache's teacher token ends, :mod:`kdistill.teachers.cross`)."""
    enc = encode_topk(indices, logprobs, vocab_size, log_rest)
    enc.update({f"x_{k}": np.asarray(v) for k, v in (extra or {}).items()})
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        sample_ids=np.asarray([s.encode("utf-8") for s in sample_ids], dtype=np.bytes_),
        token_hash=np.asarray([h.encode("ascii") for h in hashes], dtype=np.bytes_),
        offsets=np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64),
        **enc,
    )
    return buf.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _strings(arr: np.ndarray) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr.tolist()]


def read_manifest(path: Path) -> Optional[dict]:
    mf = Path(path) / "manifest.json"
    if not mf.is_file():
        return None
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError:
        raise CacheError(f"{mf}: not valid JSON (delete the cache folder and rerun kdistill cache-teacher)") from None
    if m.get("format") != FORMAT:
        raise CacheError(f"{mf}: not a kdistill teacher cache")
    if m.get("version") != VERSION:
        raise CacheError(f"{mf}: cache format version {m.get('version')}, this kdistill reads version {VERSION}")
    return m


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(Path(path) / "manifest.json", json.dumps(manifest, indent=1).encode())


class TopKCache:
    """Read access to a finished (or partial) cache folder.

    Every shard's bytes are checked against the manifest's sha256 when read, so a corrupted or
    truncated shard raises :class:`CacheError` instead of reaching training.

    Args:
        path: the cache folder.
        max_shards_in_memory: decoded shards kept in an LRU (rows are read in shuffled order).
    """

    def __init__(self, path, max_shards_in_memory: int = 16):
        self.path = Path(path)
        m = read_manifest(self.path)
        if m is None:
            raise CacheError(f"{self.path}: no teacher cache here (manifest.json missing); run `kdistill cache-teacher` first")
        self.manifest = m
        self.top_k = int(m["top_k"])
        self.vocab_size = int(m["vocab_size"])
        self.tokenizer_fingerprint = m["tokenizer_fingerprint"]
        self.teacher = m.get("teacher", "?")
        self.scale = int(m.get("logprob_scale", LOGPROB_SCALE))
        self._lru: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._max = max_shards_in_memory
        self._index: Optional[dict[str, tuple[str, int]]] = None

    # -- index -----------------------------------------------------------------------------
    def _read_shard(self, entry: dict) -> dict:
        f = self.path / entry["file"]
        try:
            data = f.read_bytes()
        except OSError:
            raise CacheError(f"{f}: shard missing; rerun `kdistill cache-teacher` to recompute it") from None
        if _sha256(data) != entry["sha256"]:
            raise CacheError(
                f"{f}: checksum mismatch (corrupted or truncated shard); rerun `kdistill cache-teacher` to recompute it"
            )
        try:
            return _load_npz(data)
        except Exception as exc:  # noqa: BLE001 - a checksum-valid shard should always load
            raise CacheError(f"{f}: unreadable shard ({type(exc).__name__}); rerun `kdistill cache-teacher`") from None

    def _shard(self, entry: dict) -> dict:
        name = entry["file"]
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        z = self._read_shard(entry)
        self._lru[name] = z
        while len(self._lru) > self._max:
            self._lru.popitem(last=False)
        return z

    def index(self) -> dict[str, tuple[str, int]]:
        """``sample id -> (shard file, row in shard)``; reads (and checksums) every shard once."""
        if self._index is None:
            idx: dict[str, tuple[str, int]] = {}
            self._hashes: dict[str, str] = {}
            for entry in self.manifest["shards"]:
                z = self._shard(entry)
                for row, (sid, th) in enumerate(zip(_strings(z["sample_ids"]), _strings(z["token_hash"]))):
                    idx[sid] = (entry["file"], row)
                    self._hashes[sid] = th
            self._index = idx
            self._entries = {e["file"]: e for e in self.manifest["shards"]}
        return self._index

    def token_hash(self, sample_id: str) -> str:
        self.index()
        return self._hashes[sample_id]

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.index()

    def __len__(self) -> int:
        return len(self.index())

    def get(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The cached positions of one row: ``(indices [n, k] int64, logprobs [n, k] float32)``."""
        file, row = self.index()[sample_id]
        z = self._shard(self._entries[file])
        a, b = int(z["offsets"][row]), int(z["offsets"][row + 1])
        return decode_topk(z["ids"][:, a:b], z["top1"][a:b], z["gaps"][:, a:b], z["log_rest"][a:b], self.scale)

    def extra(self, sample_id: str) -> dict[str, np.ndarray]:
        """The per-position arrays stored beside one row's top-k (``shard_bytes``'s ``extra``)."""
        file, row = self.index()[sample_id]
        z = self._shard(self._entries[file])
        a, b = int(z["offsets"][row]), int(z["offsets"][row + 1])
        return {k[2:]: z[k][a:b] for k in z if k.startswith("x_")}

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def bytes_per_token(self) -> float:
        tokens = sum(e["tokens"] for e in self.manifest["shards"])
        return self.disk_bytes() / max(tokens, 1)


# ---------------------------------------------------------------------------------------------
# checking a cache against a run


def check_cache(cache: TopKCache, tokenizer, vocab_size: int, features: Iterable[dict], key: str = "teacher.cache") -> None:
    """Refuse a cache that does not match the run: tokenizer, vocabulary, rows (ids and tokens).

    Raises :class:`CacheError` with one line naming the problem and the fix.
    """
    fp = tokenizer_fingerprint(tokenizer)
    if cache.tokenizer_fingerprint != fp:
        raise CacheError(
            f"{key}: {cache.path} was made with a different tokenizer (fingerprint {cache.tokenizer_fingerprint}, "
            f"the student's is {fp}); a cache only works with the teacher's tokenizer"
        )
    if cache.vocab_size > vocab_size:
        raise CacheError(
            f"{key}: {cache.path} has a vocabulary of {cache.vocab_size} tokens, more than the student's {vocab_size}"
        )
    feats = list(features)
    index = cache.index()
    missing = [f["id"] for f in feats if f["id"] not in index]
    if missing:
        raise CacheError(
            f"{key}: {len(missing)} of {len(feats)} training rows are not in {cache.path} (e.g. {missing[:3]}); "
            "run `kdistill cache-teacher` on this data.train"
        )
    changed = [f["id"] for f in feats if cache.token_hash(f["id"]) != token_hash(f)]
    if changed:
        raise CacheError(
            f"{key}: {len(changed)} rows tokenize differently than when cached (e.g. {changed[:3]}): the row text or "
            "data settings (max_length, system_prompt, chat_template) changed; rerun `kdistill cache-teacher`"
        )


# ---------------------------------------------------------------------------------------------
# writing


_OWN_FILE = re.compile(r"^(shard-\d{5,}\.npz|\.tmp-.*)$")  # what this writer ever creates besides its manifest


def open_for_writing(path: Path, meta: dict, say) -> tuple[dict, set[str]]:
    """Existing manifest (validated, bad shards dropped, stray shards removed) and the ids already done.

    A folder is only ever written into when it is new, empty, or already a kdistill cache (it has
    the manifest, which a new cache writes before anything else): any other folder is refused, so
    pointing ``cache.path`` at a data or run folder never touches the user's files. Cleanup only
    removes this writer's own leftovers (unlisted ``shard-N.npz`` and ``.tmp-*`` files).
    """
    path.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(path)
    if manifest is None:
        if any(f.name not in (MARK, LOCK) for f in path.iterdir()):
            raise CacheError(f"cache.path: {path} is not empty and is not a kdistill teacher cache (no manifest.json); "
                             "give a new or empty folder (nothing in it was changed)")
        manifest = {**meta, "shards": [], "next_shard": 0}
        write_manifest(path, manifest)
    else:
        for key in ("teacher", "tokenizer_fingerprint", "vocab_size", "top_k", "logprob_scale", "data"):
            if manifest.get(key) != meta[key]:
                raise CacheError(
                    f"cache.path: {path} holds a cache made with a different {key} "
                    f"({manifest.get(key)!r}, now {meta[key]!r}); use a new cache.path or delete this one"
                )
    done: set[str] = set()
    good = []
    for entry in manifest["shards"]:
        f = path / entry["file"]
        try:
            data = f.read_bytes()
        except OSError:
            data = None
        if data is None or _sha256(data) != entry["sha256"]:
            say(f"cache: shard {entry['file']} is {'missing' if data is None else 'corrupted'}; its rows are recomputed")
            f.unlink(missing_ok=True)
            continue
        ids = _strings(_load_npz(data)["sample_ids"])
        dup = done.intersection(ids)
        if dup:  # cannot happen with this writer; refuse to feed duplicates
            raise CacheError(f"cache.path: {path}: rows {sorted(dup)[:3]} appear in two shards; delete the cache folder")
        done.update(ids)
        good.append(entry)
    listed = {e["file"] for e in good}
    for f in path.iterdir():  # leftovers: a shard renamed before its manifest update, or temp files
        if f.is_file() and _OWN_FILE.match(f.name) and f.name not in listed:
            f.unlink(missing_ok=True)
    if len(good) != len(manifest["shards"]):
        manifest["shards"] = good
        write_manifest(path, manifest)
    return manifest, done


def append_shard(path: Path, manifest: dict, sample_ids: list[str], hashes: list[str], counts: list[int],
                 indices: np.ndarray, logprobs: np.ndarray, vocab_size: int, extra: Optional[dict] = None) -> None:
    """Write the next shard (atomically), then list it in the manifest (atomically)."""
    data = shard_bytes(sample_ids, hashes, counts, indices, logprobs, vocab_size, extra=extra)
    name = f"shard-{manifest['next_shard']:05d}.npz"
    atomic_write(Path(path) / name, data)
    manifest["shards"].append({"file": name, "sha256": _sha256(data), "bytes": len(data),
                               "samples": len(sample_ids), "tokens": int(sum(counts))})
    manifest["next_shard"] += 1
    write_manifest(path, manifest)
