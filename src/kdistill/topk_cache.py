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

A shard is a dict of named arrays (``np.savez_compressed``, no pickle; arrays other code adds are
kept as they are). For its ``n`` rows and ``T`` cached tokens it holds ``sample_ids`` ``[n]`` bytes
(UTF-8), ``token_hash`` ``[n]`` bytes (hash of the row's input ids and labels, to detect data changed
since caching), ``offsets`` ``[n+1]`` int64 (token ranges), and the top-k in one of two codecs
(:mod:`kdistill.topk_codec`), named per shard in the manifest (``"codec"``, default 1):

* **version 1** (caches written before version 2; still read): ids as byte planes, log-probs on a
  uniform 1/256-nat grid below the top-1, zlib — about 175 bytes per token at top-64;
* **version 2** (written now): log-probs on a grid that is fine near the top-1 and coarse in the
  tail, ties stored as sets, ids coded against the token read at that position (``ctx``), every
  stream LZMA-compressed — about half the size, with every divergence within 1e-4 (relative) of
  the uncompressed top-k loss (``benchmarks/cache.py`` measures both on the demo teacher).

Both store the tail mass ``log(1 − Σ top-k)`` computed in float64 from the teacher's top-k, and
decoding moves the quantized log-probs (within their rounding intervals) so that ``1 − Σ top-k`` is
that tail again: the losses derive the tail bucket from ``1 − Σ top-k``, and for a confident teacher
(tail ~1e-6) rounding alone would move it by a large factor.

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
from kdistill.topk_codec import (  # noqa: F401  (version 1 codec, re-exported)
    LOGPROB_SCALE, V2_KNEE, V2_SCALE, decode_shard_v2, decode_topk, encode_shard_v2, encode_topk, id_bytes)

FORMAT = "kdistill-topk-cache"
VERSION = 2  # of the manifest; each shard names its own codec (1 or 2), so old caches stay readable
READS = (1, 2)
CODEC = 2  # what new shards are written with
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


def cached_context(feature: dict) -> list[int]:
    """The token the teacher read at each cached position of a row (``input_ids[t]``): the context
    version 2 codes a position's top-k ids against."""
    ids, labels = feature["input_ids"], feature["labels"]
    return [ids[t] for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]


def shard_arrays(sample_ids: list[str], hashes: list[str], counts: list[int], indices: np.ndarray,
                 logprobs: np.ndarray, vocab_size: int, log_rest: Optional[np.ndarray] = None,
                 context: Optional[np.ndarray] = None, codec: int = CODEC) -> dict[str, np.ndarray]:
    """One shard's named arrays (``indices``/``logprobs`` ``[T, k]``, ``log_rest``/``context`` ``[T]``,
    rows in order). Without ``context`` version 2 codes every position against one context (valid,
    only larger)."""
    if codec == 1:
        enc = encode_topk(indices, logprobs, vocab_size, log_rest)
    else:
        ctx = np.zeros(len(indices), np.int64) if context is None else np.asarray(context, np.int64)
        enc = encode_shard_v2(indices, logprobs, ctx, vocab_size, log_rest)
    return {
        "sample_ids": np.asarray([s.encode("utf-8") for s in sample_ids], dtype=np.bytes_),
        "token_hash": np.asarray([h.encode("ascii") for h in hashes], dtype=np.bytes_),
        "offsets": np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64),
        **enc,
    }


def shard_bytes(sample_ids: list[str], hashes: list[str], counts: list[int], indices: np.ndarray,
                logprobs: np.ndarray, vocab_size: int, log_rest: Optional[np.ndarray] = None,
                context: Optional[np.ndarray] = None, codec: int = CODEC, extra: Optional[dict] = None) -> bytes:
    """Serialize one shard (see :func:`shard_arrays`); ``extra``: more per-position arrays ``{name: [T]}``,
    stored as ``x_<name>`` beside the top-k (e.g. a cross-tokenizer cache's teacher token ends,
    :mod:`kdistill.teachers.cross_sources`), read back by :meth:`TopKCache.extra`."""
    arrays = shard_arrays(sample_ids, hashes, counts, indices, logprobs, vocab_size, log_rest, context, codec)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, **{f"x_{k}": np.asarray(v) for k, v in (extra or {}).items()})
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
    if m.get("version") not in READS:
        raise CacheError(f"{mf}: cache format version {m.get('version')}, this kdistill reads versions "
                         f"{', '.join(map(str, READS))} (a newer kdistill wrote it)")
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
        """A shard's arrays; a version-2 shard is decoded whole on first read (``_ids``, ``_lp`` ``[T, k]``)."""
        name = entry["file"]
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        z = self._read_shard(entry)
        if entry.get("codec", 1) == 2:
            T = int(z["offsets"][-1])
            try:
                z["_ids"], z["_lp"] = decode_shard_v2(z, T, self.top_k, self.vocab_size, entry.get("scale", V2_SCALE),
                                                      entry.get("knee", V2_KNEE))
            except (KeyError, ValueError, IndexError) as exc:
                raise CacheError(f"{self.path / name}: unreadable shard ({type(exc).__name__}: {exc}); rerun "
                                 "`kdistill cache-teacher`") from None
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
        if "_ids" in z:
            return z["_ids"][a:b], z["_lp"][a:b]
        return decode_topk(z["ids"][:, a:b], z["top1"][a:b], z["gaps"][:, a:b], z["log_rest"][a:b], self.scale)

    def extra(self, sample_id: str) -> dict[str, np.ndarray]:
        """The per-position arrays stored beside one row's top-k (``shard_bytes``'s ``extra``)."""
        file, row = self.index()[sample_id]
        z = self._shard(self._entries[file])
        a, b = int(z["offsets"][row]), int(z["offsets"][row + 1])
        return {k[2:]: z[k][a:b] for k in z if k.startswith("x_")}

    def disk_bytes(self) -> int:
        """The cache's own bytes: its manifest and shards (not the teacher figures kept beside them)."""
        files = [self.path / "manifest.json"] + [self.path / e["file"] for e in self.manifest["shards"]]
        return sum(f.stat().st_size for f in files if f.is_file())

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
        for key in ("teacher", "tokenizer_fingerprint", "vocab_size", "top_k", "data"):
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
                 indices: np.ndarray, logprobs: np.ndarray, vocab_size: int, context: Optional[np.ndarray] = None,
                 extra: Optional[dict] = None) -> None:
    """Write the next shard (atomically, codec version 2), then list it in the manifest (atomically).

    ``context``: ``[T]`` the token read at each position (:func:`cached_context`); ``extra``: more
    per-position arrays (see :func:`shard_bytes`)."""
    data = shard_bytes(sample_ids, hashes, counts, indices, logprobs, vocab_size, context=context, extra=extra)
    name = f"shard-{manifest['next_shard']:05d}.npz"
    atomic_write(Path(path) / name, data)
    manifest["shards"].append({"file": name, "sha256": _sha256(data), "bytes": len(data),
                               "samples": len(sample_ids), "tokens": int(sum(counts)),
                               "codec": CODEC, "scale": V2_SCALE, "knee": V2_KNEE})
    manifest["next_shard"] += 1
    manifest["version"] = VERSION  # a version-1 cache resumed now holds version-2 shards too
    write_manifest(path, manifest)
