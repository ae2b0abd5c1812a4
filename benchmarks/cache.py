"""Training from the offline teacher cache vs with the live teacher: step time, bytes per token
(format version 2, and version 1 on the same rows), and how close the cached loss is to the
uncompressed top-k loss. Run by hand, never as a test:

    nice -n 15 .venv/bin/python benchmarks/cache.py                 # prints a markdown table
    nice -n 15 .venv/bin/python benchmarks/cache.py --write docs/benchmarks.md

Setup (same run, same data, same student, interleaved steps): the demo teacher
(SmolLM2-135M-Instruct, 30 layers, vocab 49152) when it is installed, else a synthetic Llama of
similar shape; a 10-layer student cut from it; demo-task rows rendered with the chat template.
A step is forward + backward + optimizer step of ``method: logit`` (forward KL, fused loss), with
the teacher signal from the live model or from the cache (read from disk through the LRU, decoded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_models import teacher_and_student, write_section


def _rows(n: int) -> list[dict]:
    from kdistill.commands.demo.task import TEMPLATES, make_rows, split_names

    rng = random.Random(0)
    rows = make_rows(n, split_names()[0], 1, "bench")
    for r in rows:  # a short answer or a few sentences: a realistic spread of response lengths
        k = rng.choice([0, 1, 3])
        r["response"] = r["reference"] if k == 0 else " ".join(
            rng.choice(TEMPLATES).format(name=r["reference"]) for _ in range(k))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="rows cached (one shard of 256 rows by default)")
    ap.add_argument("--fidelity-batches", type=int, default=3, help="batches the loss is compared on")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", help="replace the 'Teacher cache' section of this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from kdistill.commands.cache_teacher import cache_teacher
    from kdistill.topk_cache import TopKCache
    from kdistill.config import load_config
    from kdistill.data import collate, encode_examples, load_examples
    from kdistill.losses import DIVERGENCES, TopK, distill_loss
    from kdistill.methods.base import RunContext
    from kdistill.models import StudentLM
    from kdistill.methods.logit import LogitMethod
    from kdistill.models import count_params, output_vocab_size
    from kdistill.data import renderer_for as _renderer
    from kdistill.teachers.cache import CachedTeacher
    from kdistill.teachers.local import LocalTeacher

    teacher, student, tok, tname = teacher_and_student(args.student_layers)
    V = min(output_vocab_size(teacher), len(tok))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = _rows(args.rows + 4)  # every training row is cached; 4 more are the held-out rows
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: args.rows]))
        (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[args.rows:]))
        # cache-teacher through its real entry point (the teacher is loaded by spec when it is the demo)
        spec = "demo" if tname.startswith("SmolLM2") else str(tmp / "teacher")
        if spec != "demo":
            teacher.save_pretrained(tmp / "teacher")
            tok.save_pretrained(tmp / "teacher")
        cfg = load_config(None, [], base={
            "output_dir": str(tmp / "run"), "teacher": {"model": spec, "cache": str(tmp / "cache")},
            "student": {"model": "x"}, "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"),
                                                "max_length": 128,
                                                "system_prompt": "You are a helpful assistant."},
            "cache": {"top_k": args.top_k, "batch_size": args.batch_size},  # default shard_size (256 rows)
            "loss": {"divergence": "forward_kl", "alpha": 0.5}, "train": {"num_threads": args.threads},
            "eval": {"generate": False},
        })
        stats = cache_teacher(cfg, say=lambda m: print(m, file=sys.stderr), progress=False)
        feats, _ = encode_examples(_renderer(cfg, tok), load_examples(tmp / "train.jsonl"))
        cached = CachedTeacher.open(tmp / "cache", tok, V, feats)
        live = LocalTeacher(teacher, V, name=tname)
        batches = [collate(feats[i : i + args.batch_size], tok.pad_token_id) for i in range(0, len(feats), args.batch_size)]
        n_tok = [int((b["labels"] != -100).sum()) for b in batches]

        # 1. loss from the cache vs from the live, uncompressed top-k (same student logits), batch by batch
        from kdistill.teachers.local import model_topk as teacher_topk
        from kdistill.topk_cache import cached_context, cached_positions, decode_topk, shard_bytes, token_hash

        fidelity, ref_parts = {}, []
        for b0 in batches[: args.fidelity_batches]:
            keep = b0["labels"] != -100
            i, l = teacher_topk(teacher, b0, V, args.top_k)
            ref_parts.append((i, l))
            ref = TopK(torch.zeros(*keep.shape, args.top_k, dtype=torch.long), torch.zeros(*keep.shape, args.top_k))
            ref.indices[keep], ref.logprobs[keep] = i, l
            got = cached.signal(b0).topk
            with torch.no_grad():
                s_logits = student(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).logits[..., :V]
                t_logits = teacher(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).logits[..., :V]
            for d in DIVERGENCES:
                for T in (1.0, 2.0):
                    a = float(distill_loss(s_logits, None, b0["labels"], divergence=d, temperature=T, teacher_topk=ref))
                    c = float(distill_loss(s_logits, None, b0["labels"], divergence=d, temperature=T, teacher_topk=got))
                    full = float(distill_loss(s_logits, t_logits, b0["labels"], divergence=d, temperature=T))
                    if (d, T) not in fidelity or abs(c - a) / abs(a) > fidelity[(d, T)][0]:
                        fidelity[(d, T)] = (abs(c - a) / abs(a), a, full)
        # the same rows in the previous format (version 1), for the size comparison
        part = feats[: args.batch_size * args.fidelity_batches]
        ii = torch.cat([p[0] for p in ref_parts]).numpy()
        ll = torch.cat([p[1] for p in ref_parts]).numpy()
        args_v = ([f["id"] for f in part], [token_hash(f) for f in part], [cached_positions(f) for f in part], ii, ll, V)
        ctx = np.asarray([t for f in part for t in cached_context(f)])
        sizes = {v: len(shard_bytes(*args_v, context=ctx, codec=v)) / max(1, len(ii)) for v in (1, 2)}

        # 2. step time, live teacher vs cache, interleaved on the same batches
        wrapper = StudentLM(student)
        opt = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-5)
        methods = {}
        for mode, t in (("live", live), ("cache", cached)):
            ctx = RunContext(cfg=cfg, tokenizer=tok, teacher=t, vocab_size=V, output_dir=tmp)
            methods[mode] = LogitMethod(ctx)
        times = {"live": [], "cache": []}
        signal_times = {"live": [], "cache": []}
        wrapper.train()
        for step in range(args.steps + 1):
            for mode in ("live", "cache") if step % 2 == 0 else ("cache", "live"):
                b = batches[step % len(batches)]
                n = max(1, int((b["labels"] != -100).sum()))
                t0 = time.perf_counter()
                loss, _ = methods[mode].loss(wrapper, b, n)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                t1 = time.perf_counter()
                methods[mode].ctx.teacher.signal(b, hidden=True)
                ds = time.perf_counter() - t1
                if step > 0:
                    times[mode].append(dt)
                    signal_times[mode].append(ds)
        cache_obj = TopKCache(tmp / "cache")
        result = {
            "teacher": tname, "teacher_params": count_params(teacher), "student_params": count_params(student),
            "student_layers": args.student_layers, "vocab": V, "top_k": args.top_k, "rows": args.rows,
            "batch_size": args.batch_size, "tokens_per_batch": round(statistics.mean(n_tok), 1),
            "cached_tokens": stats["tokens"], "bytes_per_token": round(cache_obj.bytes_per_token(), 1),
            "cache_tokens_per_s": stats["tokens_per_s"],
            "step_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "signal_s": {k: round(statistics.median(v), 4) for k, v in signal_times.items()},
            "max_rel_diff_vs_uncompressed_topk": max(v[0] for v in fidelity.values()),
            "fidelity_tokens": int(sum(len(p[0]) for p in ref_parts)),
            "shard_bytes_per_token_small": {f"v{v}": round(b, 1) for v, b in sizes.items()},
            "shards": len(cache_obj.manifest["shards"]),
            "threads": args.threads, "machine": f"{platform.machine()}, torch {torch.__version__}",
            "load_avg_1min": round(os.getloadavg()[0], 1),
        }
    md = _markdown(result, fidelity, argv)
    print(md)
    print(json.dumps(result), file=sys.stderr)
    if args.write:
        write_section(Path(args.write), md, "## Teacher cache")
    return 0


def _markdown(r: dict, fidelity: dict, argv) -> str:
    live, cache = r["step_s"]["live"], r["step_s"]["cache"]
    cmd = "nice -n 15 .venv/bin/python benchmarks/cache.py" + ("" if not argv else " " + " ".join(
        a for a in argv if not a.startswith("--write")))
    lines = [
        "## Teacher cache",
        "",
        f"Command: `{cmd}` ({r['threads']} CPU threads, {r['machine']}; 1-minute load average "
        f"{r['load_avg_1min']} at the end: other jobs shared the 2 cores, so absolute times are inflated and noisy, "
        "the interleaved live/cache comparison less so).",
        "",
        f"Teacher: {r['teacher']} ({r['teacher_params'] / 1e6:.0f}M parameters, vocab {r['vocab']:,}); student: "
        f"{r['student_layers']} of its layers ({r['student_params'] / 1e6:.0f}M). {r['rows']} demo-task rows, "
        f"batch {r['batch_size']} (~{r['tokens_per_batch']:.0f} response tokens per batch), `method: logit`, forward KL, "
        "fused loss. Step = forward + backward + optimizer step; median of interleaved steps on the same batches "
        "in one process.",
        "",
        "| teacher signal | step time (s) | teacher signal alone (s) |",
        "|---|---|---|",
        f"| live teacher model | {live:.3f} | {r['signal_s']['live']:.4f} |",
        f"| offline cache (top-{r['top_k']}) | {cache:.3f} | {r['signal_s']['cache']:.4f} |",
        "",
        f"Training from the cache: **{live / cache:.2f}x** faster per step ({(1 - cache / live):.0%} less time), "
        "and no teacher weights in memory.",
        "",
        f"Cache (format version 2): top-{r['top_k']}, **{r['bytes_per_token']} bytes per cached token** on disk "
        f"(**{r['bytes_per_token'] / r['top_k']:.2f} bytes per kept entry**; goal: at most 96 bytes per token, 1.5 per "
        f"entry; DistillKit publishes ~2.3 per entry), manifest and {r['shards']} shard(s), {r['cached_tokens']:,} "
        f"tokens; `cache-teacher` ran at {r['cache_tokens_per_s']} tokens/s. The first "
        f"{r['fidelity_tokens']} tokens alone as one shard: version 1 {r['shard_bytes_per_token_small']['v1']} bytes per "
        f"token, version 2 {r['shard_bytes_per_token_small']['v2']} (a small shard has less context to code against).",
        "",
        f"Loss from the cache vs from the uncompressed top-k (same student logits; the largest difference over the "
        f"first {r['fidelity_tokens']} tokens, batch by batch; goal: every one within 1e-4); the full-vocabulary loss "
        "for scale:",
        "",
        "| divergence | T | relative difference | uncompressed top-k | full vocabulary |",
        "|---|---|---|---|---|",
    ]
    for (d, T), (rel, a, full) in fidelity.items():
        lines.append(f"| {d} | {T:g} | {rel:.1e} | {a:.4f} | {full:.4f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
