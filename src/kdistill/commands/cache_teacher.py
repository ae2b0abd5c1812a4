"""``kdistill cache-teacher CONFIG``: the teacher's top-k log-probs on ``data.train`` -> a resumable cache.

The teacher runs once over the rows of ``data.train`` (rendered and tokenized exactly as
``kdistill run`` renders them); for every position whose label is not -100 its ``cache.top_k``
token ids and log-probs are stored in shards (:mod:`kdistill.topk_cache`). The teacher is a local
``teacher.model``, or a vLLM server (``teacher.api.logprobs``; the rows are then tokenized with
``student.model``'s tokenizer). While the teacher is at hand, its held-out figures are stored beside
the cache, so that runs from the cache alone can still report retention. With ``loss.cross_tokenizer``
(a student with another tokenizer) the rows are rendered as the teacher reads them, and the
teacher's tokenization of every answer is stored beside the top-k, with the teacher's tokenizer
(:mod:`kdistill.teachers.cross_sources`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from kdistill.config import check_paths, load_config
from kdistill.console import say as console_say
from kdistill.data import Renderer, collate, encode_examples
from kdistill.errors import ConfigError, KDistillError
from kdistill.evaluate import eval_fingerprint, heldout_figures
from kdistill.models import count_params, load_model, load_tokenizer, output_vocab_size, tokenizer_fingerprint
from kdistill.alignment import encode_aligned
from kdistill.splits import read_rows
from kdistill.store import atomic_write, check_own_folder, exclusive, read_json
from kdistill.teachers import HeldOut, LocalTeacher, ServedTeacher
from kdistill.teachers.cross import TEACHER_TOKENIZER_DIR, ends
from kdistill.teachers.cross_sources import cache_arrays, teacher_renderer, topk_with_labels
from kdistill.teachers.served import PROBE
from kdistill.teachers.served_identity import identity_mismatch, served_identity
from kdistill.teachers.text import answered_figures
from kdistill.topk_cache import (FORMAT, LOCK, LOGPROB_SCALE, TEACHER_EVAL_FILE, VERSION, CacheError, TopKCache,
                                 append_shard, cached_context, cached_positions, id_bytes, open_for_writing, token_hash, write_manifest)

log = logging.getLogger("kdistill")


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    stats = cache_teacher(cfg, say=console_say, progress=not args.no_progress)
    print(f"cache: {stats['path']}: {stats['rows']} rows, {stats['tokens']} tokens, top-{stats['top_k']}, "
          f"{stats['bytes_per_token']} bytes per token")
    return 0


def _served(cfg) -> bool:
    api = cfg.teacher.api
    return api is not None and api.logprobs is not None and cfg.teacher.model is None and cfg.teacher.cache is None


def cache_teacher(cfg, say: Callable[[str], None] = log.info, progress: bool = True) -> dict:
    """Top-k teacher log-probs for every row of ``data.train``; returns statistics (rows, tokens,
    bytes, bytes per token, seconds, tokens/s)."""
    path_s = cfg.cache.path or cfg.teacher.cache
    if path_s is None:
        raise ConfigError("cache.path: required for cache-teacher (the folder the cache is written to)")
    served = _served(cfg)
    if cfg.teacher.model is None and not served:
        raise ConfigError("teacher.model: required for cache-teacher (the model whose top-k log-probs are cached), "
                          "or teacher.api with api.logprobs (a vLLM server)")
    if served and (cfg.student is None or cfg.student.model is None):
        raise ConfigError("student.model: cache-teacher from a served teacher (teacher.api.logprobs) needs the "
                          "student's tokenizer: give student.model")
    check_paths(cfg)
    path = Path(path_s)
    rows = read_rows(cfg, require_response=True, say=say).train  # every task's rows, as `kdistill run` mixes them

    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if served:  # the teacher is a vLLM server: its top-k come over HTTP, tokenized with the student's tokenizer
        tok = load_tokenizer(cfg.student.model, "student.model", cfg.student.revision, cfg.student.trust_remote_code)
        vocab = len(tok)
        teacher = ServedTeacher(cfg.teacher.api, vocab)
        say(f"cache: teacher {teacher.name}; {teacher.check_tokenizer(tok)}")
        teacher_name, k = f"api:{cfg.teacher.api.model}", teacher.top_k
        if cfg.cache.top_k != k:
            say(f"cache: top-{k} from teacher.api.logprobs (cache.top_k={cfg.cache.top_k} applies to a local teacher)")
    else:
        model, tok = load_model(cfg.teacher.model, "teacher.model", cfg.teacher.dtype, cfg.teacher.revision,
                                cfg.teacher.trust_remote_code)
        model.to(device)
        say(f"cache: teacher {cfg.teacher.model} loaded ({time.time() - t0:.1f} s)")
        teacher_name = cfg.teacher.model
        vocab = min(output_vocab_size(model), len(tok))  # without padding rows beyond the tokenizer
        teacher = LocalTeacher(model, vocab, name=teacher_name, tokenizer=tok)
        k = min(cfg.cache.top_k, vocab)
    meta = {
        "format": FORMAT, "version": VERSION, "teacher": teacher_name, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": vocab, "top_k": k, "id_bytes": id_bytes(vocab), "logprob_scale": LOGPROB_SCALE,
        "data": {"max_length": cfg.data.max_length, "system_prompt": cfg.data.system_prompt,
                 "chat_template": cfg.data.chat_template},
    }
    cross = cfg.loss.cross_tokenizer is not None and not served  # the student has another tokenizer
    if cross:  # rows rendered as the teacher reads them; its tokenization is stored beside the top-k
        renderer = teacher_renderer(cfg, tok, cfg.teacher)
        meta["data"]["cross_tokenizer"] = {"end_of_turn": cfg.teacher.end_of_turn, "max_length": renderer.max_length}
    else:
        renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template)
    check_own_folder(path, "cache.path", "teacher cache", also_ours=("manifest.json",))
    with exclusive(path / LOCK, f"the cache {path}", "cache.path"):
        return _fill(cfg, path, meta, teacher, tok, vocab, k, rows, device, served, say, progress, cross, renderer)


def _fill(cfg, path: Path, meta: dict, teacher, tok, vocab: int, k: int, rows, device, served: bool, say,
          progress: bool, cross: bool, renderer: Renderer) -> dict:
    """Write every missing row's shard (resumable), then the teacher's held-out figures."""
    manifest, done = open_for_writing(path, meta, say)
    if cross:
        tok.save_pretrained(str(path / TEACHER_TOKENIZER_DIR))
        eot = ends(teacher.model, tok, renderer, cfg.teacher)[0]
        feats = [f for f in (encode_aligned(renderer, e, eot) for e in rows) if cached_positions(f)]
        n_empty = len(rows) - len(feats)
    else:
        feats, n_empty = encode_examples(renderer, rows)
    todo = [f for f in feats if f["id"] not in done]
    if served and todo:  # a cache holds one teacher's signal: the same server identity, or a clear refusal
        _check_same_server(path, manifest, served_identity(teacher, tok, PROBE), cfg.cache.accept_teacher_change,
                           say)
    n_tok_todo = sum(cached_positions(f) for f in todo)
    if done:
        say(f"cache: resuming: {len(feats) - len(todo)} of {len(feats)} rows already cached in {path}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tok_todo, desc="cache-teacher", unit="tok", unit_scale=True, dynamic_ncols=True)
    t1 = time.time()
    bs, pad = cfg.cache.batch_size, tok.pad_token_id
    for s in range(0, len(todo), cfg.cache.shard_size):
        shard = todo[s: s + cfg.cache.shard_size]
        idx_parts, lp_parts, own_parts = [], [], []
        for b in range(0, len(shard), bs):
            batch = collate(shard[b: b + bs], pad)
            batch = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in batch.items()}
            i, lp, own = topk_with_labels(teacher.model, batch, vocab, k) if cross else teacher.topk_at_labels(batch, k)
            idx_parts.append(i.cpu().numpy())
            lp_parts.append(lp.cpu().numpy())
            own_parts.append(own.cpu().numpy() if own is not None else None)
            if bar is not None:
                bar.update(int(i.shape[0]))
        extra = cache_arrays(shard, np.concatenate(own_parts)) if cross else None
        append_shard(path, manifest, [f["id"] for f in shard], [token_hash(f) for f in shard],
                     [cached_positions(f) for f in shard], np.concatenate(idx_parts), np.concatenate(lp_parts), vocab,
                     extra=extra, context=np.asarray([t for f in shard for t in cached_context(f)], np.int64))
    if bar is not None:
        bar.close()
    dt = time.time() - t1
    cache = TopKCache(path)
    tokens = sum(e["tokens"] for e in manifest["shards"])
    stats = {
        "path": str(path), "rows": len(feats), "rows_computed": len(todo), "rows_without_response_tokens": n_empty,
        "tokens": tokens, "top_k": k, "bytes": cache.disk_bytes(), "bytes_per_token": round(cache.bytes_per_token(), 1),
        "seconds": round(dt, 1), "tokens_per_s": round(n_tok_todo / dt, 1) if dt > 0 and n_tok_todo else None,
    }
    say(f"cache: {stats['rows']} rows, {tokens:,} tokens, top-{k}, {stats['bytes'] / 2**20:.2f} MiB on disk = "
        f"{stats['bytes_per_token']} bytes per token ({len(manifest['shards'])} shards) in {path}")
    stats["teacher_eval"] = _teacher_eval(cfg, teacher, tok, vocab, path, device, say)
    if served:
        stats["api"] = teacher.summary()
    return stats


def _check_same_server(path: Path, manifest: dict, now: dict, accept: bool, say) -> None:
    """Record the served teacher's identity in a new cache's manifest; refuse to extend a cache made
    from a server that now reports or measures differently (unless ``accept``)."""
    say(f"cache: served teacher {now['root'] or now['model']}, vLLM {now['version'] or '?'}, log-probs computed in "
        f"{now['logprob_dtype']}")
    old = manifest.get("served")
    why = identity_mismatch(old, now) if old is not None else None
    if why is not None and not accept:
        raise CacheError(f"cache.path: {path} was made from another served teacher: {why}; use a new cache.path, "
                         "or set cache.accept_teacher_change: true to extend it anyway")
    if why is not None:
        say(f"cache: the served teacher changed ({why}); extending the cache anyway (cache.accept_teacher_change)")
        manifest.setdefault("served_changes", []).append(now)
    elif old is None and manifest["shards"]:
        say("cache: made before served teachers' identities were recorded; recording this server's")
    if old is None:
        manifest["served"] = now
    write_manifest(path, manifest)


def _teacher_eval(cfg, teacher, tok, vocab: int, path: Path, device, say) -> Optional[dict]:
    """The teacher's held-out figures, stored beside the cache so that runs training from the cache
    alone can report retention (see :meth:`kdistill.teachers.cache.CachedTeacher.heldout`)."""
    try:
        eval_rows = read_rows(cfg, require_train=False, say=say).held
    except KDistillError as exc:
        say(f"cache: no teacher figures stored ({exc})")
        return None
    fp = eval_fingerprint(cfg, eval_rows)
    out = path / TEACHER_EVAL_FILE
    saved = read_json(out)
    if isinstance(saved, dict) and saved.get("fingerprint") == fp:
        return saved["metrics"]
    renderer = (teacher_renderer(cfg, tok, cfg.teacher) if cfg.loss.cross_tokenizer is not None and not _served(cfg)
                else Renderer(tok, cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template))
    feats, _ = encode_examples(renderer, eval_rows)
    say(f"cache: evaluating the teacher on {len(eval_rows)} held-out rows (stored in {out}, for retention)")
    if isinstance(teacher, ServedTeacher):  # its answers (kept in a subfolder) and log-probs
        answers = path / "eval_answers"
        answers.mkdir(exist_ok=True)
        ho = HeldOut(cfg, eval_rows, feats, answers, tok.pad_token_id, say)
        ev, params = answered_figures(ho, cfg.teacher.api, served=teacher, answers_dir=answers), None
    else:
        ev = heldout_figures(teacher.model, tok, renderer, eval_rows, feats, cfg.eval, vocab, is_teacher=True,
                             device=device)
        params = count_params(teacher.model)
    atomic_write(out, json.dumps({"fingerprint": fp, "teacher": teacher.name, "rows": len(eval_rows), "params": params,
                                  **ev}, indent=1))
    return ev["metrics"]
