"""Padding share of training batches under each ``train.batching`` (load-independent; run by hand):

    .venv/bin/python benchmarks/padding.py
    .venv/bin/python benchmarks/padding.py --write docs/benchmarks.md

One epoch of micro-batches of 8, exactly as the trainer builds them (the same schedules and collate
functions), for two datasets tokenized with the demo teacher's tokenizer and chat template:

* the demo's: ``kdistill demo``'s name-extraction prompts with the name as the answer (the demo trains
  on the teacher's answers that contain the name; most are the name alone);
* the benchmarks': ``benchmarks/cache.py``'s and ``benchmarks/vs_trl.py``'s rows (answers of one to
  three sentences).

Padding share = padded positions / all positions the student's forward sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_models import write_section


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--write", help="replace the 'Padding' section of this markdown file")
    args = ap.parse_args(argv)

    from cache import _rows

    from kdistill.batching import grouped_schedule, make_collate, padding_counts
    from kdistill.commands.demo.task import make_rows, split_names
    from kdistill.data import Renderer, encode_examples, parse_row
    from kdistill.models import load_tokenizer
    from kdistill.trainer import _epoch_batches

    tok = load_tokenizer("demo")
    renderer = Renderer(tok, 128, "You are a helpful assistant.")
    demo = [{**r, "response": r["reference"]} for r in make_rows(args.rows, split_names()[0], 1, "train")]
    sets = {"demo task (answer: the name)": demo, "benchmark rows (1-3 sentences)": _rows(args.rows)}

    class Student:  # the demo's 14-layer cut: hidden 576, sdpa (what packing's width choice needs)
        class config:
            hidden_size = 576
            _attn_implementation = "sdpa"

    lines = ["## Padding (`benchmarks/padding.py`)", "",
             f"Command: `.venv/bin/python benchmarks/padding.py` (load-independent). One epoch of {args.rows} rows in "
             f"micro-batches of {args.batch_size}, max length 128, the demo teacher's tokenizer and chat template; "
             "padded positions / all positions of the student's forward.", "",
             "| data | mean tokens per row | shuffle | length_grouped (default) | packed |", "|---|---|---|---|---|"]
    for name, rows in sets.items():
        feats, _ = encode_examples(renderer, [parse_row(r, "x") for r in rows])
        n, bs = len(feats), args.batch_size
        share = {}
        for mode in ("shuffle", "length_grouped", "packed"):
            batches = (grouped_schedule(feats, bs, 0)(0) if mode == "length_grouped" else _epoch_batches(n, bs, 0, 0))
            collate = make_collate(mode, tok.pad_token_id, Student())
            real = total = 0
            for b in batches:
                r, t = padding_counts(collate([feats[i] for i in b]))
                real, total = real + r, total + t
            share[mode] = 1 - real / total
        mean = sum(len(f["input_ids"]) for f in feats) / n
        lines.append(f"| {name} | {mean:.1f} | {share['shuffle']:.1%} | {share['length_grouped']:.1%} | "
                     f"{share['packed']:.1%} |")
    lines.append("")
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(Path(args.write), md, "## Padding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
