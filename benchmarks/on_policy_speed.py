"""Sampling speed on CPU: transformers ``generate`` (dynamic and static KV cache) vs kdistill's lean
loop (:mod:`kdistill.decode`: finished rows leave the batch). Run by hand:

    nice -n 15 .venv/bin/python benchmarks/on_policy_speed.py                # prints a markdown table
    nice -n 15 .venv/bin/python benchmarks/on_policy_speed.py --write docs/benchmarks.md

Same prompts (demo-task prompts with the chat template), batch 8, up to 32 new tokens, the modes
interleaved and repeated; median seconds. Two models: the student the on-policy benchmark trains
(the demo teacher cut to 14 layers, sampling at T = 1: untrained, it rarely stops early) and the
demo teacher itself, greedy (it answers in a few tokens, so rows end at different times).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_models import teacher_and_student, write_section


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student-layers", type=int, default=14)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", help="replace the 'Sampling speed' section of this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from kdistill.commands.demo.task import make_rows, split_names
    from kdistill.data import Example, Renderer
    from kdistill.models import eos_ids
    from kdistill.sampling import sample_completions

    teacher, student, tok, name = teacher_and_student(args.student_layers)
    renderer = Renderer(tok, 128, "You are a helpful assistant.")
    rows = make_rows(args.batch, split_names()[0], 1, "speed")
    prompts = [renderer.prompt_ids(Example(r["id"], [{"role": "user", "content": r["prompt"]}], None)) for r in rows]

    def generate_static(model, temp):
        """transformers generate with its static KV cache (no torch.compile on CPU)."""
        hf_kwargs = dict(max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(model, tok),
                         cache_implementation="static")
        if temp > 0:
            hf_kwargs.update(do_sample=True, temperature=temp, top_k=0, top_p=1.0)
        else:
            hf_kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        from kdistill.data import collate_prompts
        from kdistill.models import cut_at_eos

        b = collate_prompts(prompts, tok.pad_token_id)
        with torch.no_grad():
            gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **hf_kwargs)
        return [cut_at_eos(r, eos_ids(model, tok)) for r in gen[:, b["input_ids"].shape[1]:].tolist()]

    modes = {
        "generate (dynamic cache)": lambda m, t: sample_completions(m, tok, prompts, args.new_tokens, t, args.batch,
                                                                    lean_loop=False),
        "generate (static cache)": generate_static,
        "kdistill loop (rows leave)": lambda m, t: sample_completions(m, tok, prompts, args.new_tokens, t, args.batch),
    }
    results = {}
    for label, model, temp in ((f"student ({args.student_layers} layers, T=1)", student, 1.0),
                               ("teacher (greedy)", teacher, 0.0)):
        model.eval()
        times: dict[str, list[float]] = {m: [] for m in modes}
        tokens: dict[str, int] = {}
        for rep in range(args.repeats + 1):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for m in order:
                torch.manual_seed(rep)
                t0 = time.perf_counter()
                comps = modes[m](model, temp)
                dt = time.perf_counter() - t0
                if rep:  # the first round warms up
                    times[m].append(dt)
                tokens[m] = sum(map(len, comps))
        results[label] = {m: (statistics.median(v), tokens[m]) for m, v in times.items()}
        print(label, results[label], file=sys.stderr)

    cmd = "nice -n 15 .venv/bin/python benchmarks/on_policy_speed.py" + "".join(
        f" {a}" for a in (argv or sys.argv[1:]) if not a.startswith("--write"))
    lines = ["## Sampling speed (`benchmarks/on_policy_speed.py`)", "",
             f"Command: `{cmd}` ({args.threads} CPU threads, torch {torch.__version__}; 1-minute load average "
             f"{os.getloadavg()[0]:.1f} at the end: the machine was shared, so absolute times are inflated; the modes "
             "were interleaved). Demo teacher: " + name + f". {args.batch} demo-task prompts, up to {args.new_tokens} "
             "new tokens, median of " + f"{args.repeats} rounds.", "",
             "| model | mode | seconds | tokens written | vs generate (dynamic) |", "|---|---|---|---|---|"]
    for label, r in results.items():
        base = r["generate (dynamic cache)"][0]
        for m, (sec, n) in r.items():
            lines.append(f"| {label} | {m} | {sec:.2f} | {n} | {base / sec:.2f}x |")
    lines.append("")
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(Path(args.write), md, "## Sampling speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
