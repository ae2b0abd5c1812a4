"""Student sampling for on-policy methods: vLLM (colocated, weights synced) vs transformers.

Needs a CUDA GPU and vllm (``pip install 'kdistill[vllm]'``); without vllm it says so and exits 0.
Run by hand or from ``make bench``:

    .venv/bin/python benchmarks/on_policy_engines.py            # prints a markdown table
    PYTHONPATH=tests/fake_vllm .venv/bin/python benchmarks/on_policy_engines.py --prompts 4 --new-tokens 8
        # the same code path against the test fake (CPU; checks the script, its timings mean nothing)

Same run, same prompts, same student (the demo teacher cut to ``--student-layers`` layers):

1. **throughput**: ``--prompts`` prompts x ``--samples`` samples of up to ``--new-tokens`` tokens at
   temperature 1, with each engine (the vLLM figure includes its weight load);
2. **weight sync**: the student takes one optimizer step (AdamW, lr 1e-3, on a cross-entropy batch,
   so its greedy answers change); greedy completions from vLLM (after its sync) are compared with
   transformers' greedy completions from the *updated* student and from the *old* one. A correct
   sync agrees with the updated student (up to kernel numerics), not with the old one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = ap.parse_args()

    try:
        import vllm
    except ImportError:
        print("on_policy_engines: skipped (vllm is not installed; it needs a CUDA GPU)")
        return 0
    import torch
    from bench_models import teacher_and_student

    from kdistill.config import VllmConfig
    from kdistill.data import Example, Renderer
    from kdistill.commands.demo.task import make_rows, split_names
    from kdistill.sampling import HFSampler
    from kdistill.vllm_engine import VllmSampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, student, tok, name = teacher_and_student(args.student_layers)
    k = len(student.model.layers)
    student = student.to(device)
    del teacher
    renderer = Renderer(tok, 512)
    rows = make_rows(args.prompts, split_names()[0], 1, "bench")
    prompts = [renderer.prompt_ids(Example(r["id"], [{"role": "user", "content": r["prompt"]}], None)) for i, r in enumerate(rows)]

    vcfg = VllmConfig(gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype)
    work = Path(tempfile.mkdtemp(prefix="kd-vllm-"))
    t = time.time()
    vs = VllmSampler(student, tok, work / "engine", vcfg, "bench", seed=0, max_model_len=512,
                     mixed_precision="bf16" if args.dtype == "bfloat16" else "no")  # the student computes in it
    start_s = time.time() - t
    hs = HFSampler(tok, batch_size=64)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.time() - t0

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and args.dtype == "bfloat16") else None

    def hf_sample(temp, n_samples):
        if amp is None:
            return hs(student, prompts, args.new_tokens, temp, n_samples)
        with amp:
            return hs(student, prompts, args.new_tokens, temp, n_samples)

    comps_h, t_h = timed(lambda: hf_sample(1.0, args.samples))
    comps_v, t_v = timed(lambda: vs(student, prompts, args.new_tokens, 1.0, args.samples))
    tok_h, tok_v = sum(map(len, comps_h)), sum(map(len, comps_v))

    # weight sync: one optimizer step that changes the student's greedy answers
    old = hs(student, prompts, args.new_tokens, 0.0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    seq = [p + c for p, c in zip(prompts, comps_h[:: args.samples])][:32]
    width = max(map(len, seq))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seq], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seq], device=device)
    labels = ids.masked_fill(mask == 0, -100)
    student(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    new = hs(student, prompts, args.new_tokens, 0.0)
    vs.mark_stale()
    synced, t_sync_gen = timed(lambda: vs(student, prompts, args.new_tokens, 0.0))

    def agree(a, b):
        return sum(x == y for x, y in zip(a, b)) / len(a)

    changed = 1 - agree(old, new)
    print(f"## Student sampling: vLLM {vllm.__version__} vs transformers ({name}, {k} layers, {args.dtype}, "
          f"{device.type}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''})\n")
    print(f"{args.prompts} prompts x {args.samples} samples, up to {args.new_tokens} new tokens, temperature 1\n")
    print("| engine | seconds | tokens | tokens/s |\n|---|---|---|---|")
    print(f"| transformers generate | {t_h:.2f} | {tok_h} | {tok_h / t_h:.0f} |")
    print(f"| vLLM (incl. first weight load) | {t_v:.2f} | {tok_v} | {tok_v / t_v:.0f} |")
    print(f"\nvLLM / transformers time: **{t_v / t_h:.3f}** (tokens/s ratio {(tok_v / t_v) / (tok_h / t_h):.2f}); "
          f"engine start {start_s:.1f} s; weight load + greedy generation after a step {t_sync_gen:.2f} s\n")
    print("| greedy completions after one optimizer step | share identical |\n|---|---|")
    print(f"| transformers: updated vs old student (how much the step changed) | {1 - changed:.3f} |")
    print(f"| vLLM (synced) vs transformers, updated student | **{agree(synced, new):.3f}** |")
    print(f"| vLLM (synced) vs transformers, old student | {agree(synced, old):.3f} |")
    print(f"\nengine stats: {vs.stats}")
    ok = agree(synced, new) > agree(synced, old)
    print("weight sync: " + ("OK (vLLM follows the updated student)" if ok else "FAILED (vLLM does not follow the update)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
