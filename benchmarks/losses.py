"""Peak memory and forward+backward time: ``fused_distill_loss`` against a naive reference
(and ``label_logprobs``, the chunked cross-entropy / DPO / scoring path, against ``F.cross_entropy``).

The naive reference is what a straightforward implementation does: materialize the
``[tokens, vocab]`` student and teacher logits, apply the textbook formula of the divergence,
let autograd differentiate it. Every (divergence, implementation) case runs in a fresh
subprocess, so one case's memory cannot hide or inflate another's:

* CPU: peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the
  measured call; ``ru_maxrss`` where that is unavailable) minus the resident memory just before
  the call, i.e. everything the loss's forward and backward add on top of the inputs, including
  the gradients they leave behind.
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated just before the call.

Time is the wall clock of one forward+backward (CPU: a single run, after a small warm-up on a
few tokens; CUDA: the median of ``--repeat`` runs after two warm-ups). On CPU the process's CPU
time (user + system, all threads) is reported too: on a machine shared with other work, wall
time measures the neighbours as much as the loss, CPU time much less so.

    python benchmarks/losses.py                      # CPU: hidden 576, vocab 49152, 8192 tokens, float32
    python benchmarks/losses.py --quick              # a smaller shape, for a smoke test
    python benchmarks/losses.py --divergences jsd,tvd --tokens 4096

On a GPU the defaults become hidden 4096, vocab 128256, 8192 tokens, bfloat16 inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
               "cross_entropy")  # the last: no teacher; label log-probs (SFT, DPO, scoring)
BETA, SKEW, TEMPERATURE = 0.5, 0.1, 1.0


# ---------------------------------------------------------------------------------------------
# the naive reference


def naive_loss(h, w, th, tw, labels, divergence, temperature=TEMPERATURE, beta=BETA, skew=SKEW):
    """Materialized logits, textbook formulas, autograd."""
    import torch

    if divergence == "cross_entropy":  # what PyTorch users write: F.cross_entropy on the full logits
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), labels)
    s = (h @ w.t()).float() / temperature
    with torch.no_grad():
        t = (th @ tw.t()).float() / temperature
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        d = (p * (lt - ls)).sum(-1)
    elif divergence == "reverse_kl":
        d = (q * (ls - lt)).sum(-1)
    elif divergence == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        d = beta * (p * (lt - lm)).sum(-1) + (1 - beta) * (q * (ls - lm)).sum(-1)
    elif divergence == "skew_forward_kl":
        d = (p * (lt - (skew * p + (1 - skew) * q).log())).sum(-1)
    elif divergence == "skew_reverse_kl":
        d = (q * (ls - ((1 - skew) * p + skew * q).log())).sum(-1)
    elif divergence == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    else:
        raise ValueError(divergence)
    mask = labels != -100
    return (d * mask).sum() * temperature**2 / mask.sum()


def fused_loss(h, w, th, tw, labels, divergence):
    from kdistill.losses import fused_distill_loss, label_logprobs

    if divergence == "cross_entropy":
        return -label_logprobs(h, w, labels).sum() / (labels != -100).sum()

    return fused_distill_loss(h, w, th, tw, labels, divergence=divergence, temperature=TEMPERATURE, beta=BETA, skew=SKEW)


def liger_loss(h, w, th, tw, labels, divergence):
    """Liger-Kernel's chunked fused-linear JSD (GPU, Triton; ``pip install liger-kernel``): jsd only."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    if divergence != "jsd":
        raise ValueError("liger: only jsd has a fused-linear kernel here")
    return LigerFusedLinearJSD(jsd_beta=BETA, ignore_index=-100, temperature=TEMPERATURE)(h, w, th, tw, labels)


# ---------------------------------------------------------------------------------------------
# one measured case (runs in its own process)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _inputs(tokens, vocab, hidden, dtype, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
    h = mk(tokens, hidden).requires_grad_()
    w = mk(vocab, hidden, scale=hidden**-0.5 * 2).requires_grad_()
    th = mk(tokens, hidden)
    tw = mk(vocab, hidden, scale=hidden**-0.5 * 3)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return h, w, th, tw, labels


def run_case(impl, divergence, tokens, vocab, hidden, device, dtype_name, repeat) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    fn = {"naive": naive_loss, "fused": fused_loss, "liger": liger_loss}[impl]

    def step(args):
        loss = fn(*args, divergence)
        loss.backward()
        return float(loss)

    step(_inputs(min(tokens, 64), vocab, hidden, dtype, device, seed=1))  # warm-up: lazy init, kernels
    args = _inputs(tokens, vocab, hidden, dtype, device)
    gc.collect()
    if device == "cuda":
        for _ in range(2):
            args[0].grad = args[1].grad = None
            step(args)
        times = []
        for _ in range(max(repeat, 1)):
            args[0].grad = args[1].grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            value = step(args)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        seconds = sorted(times)[len(times) // 2]
    else:
        reset_ok = _reset_peak()
        base = _rss_kb()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        value = step(args)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        peak_mb = (_peak_kb(reset_ok) - base) / 1024
    out = {"impl": impl, "divergence": divergence, "peak_mb": peak_mb, "seconds": seconds, "value": value}
    if device != "cuda":
        out["cpu_seconds"] = cpu
    return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------
# driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="tokens (rows), all unmasked (default 8192)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 49152 on CPU, 128256 on CUDA)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size of student and teacher (default 576 / 4096)")
    ap.add_argument("--divergences", default=",".join(DIVERGENCES), help="comma-separated")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="input dtype (default float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case on CUDA (the median is shown)")
    ap.add_argument("--quick", action="store_true", help="small shape (1024 tokens, vocab 8192, hidden 256)")
    ap.add_argument("--impls", default="naive,fused", help="naive,fused[,liger] (liger: jsd only, CUDA)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:  # one case, in this (fresh) process
        spec = json.loads(a.worker)
        print("RESULT " + json.dumps(run_case(**spec)), flush=True)
        return 0

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    gpu = device == "cuda"
    tokens = a.tokens or (1024 if a.quick else 8192)
    vocab = a.vocab or (8192 if a.quick else (128256 if gpu else 49152))
    hidden = a.hidden or (256 if a.quick else (4096 if gpu else 576))
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    divs = [d.strip() for d in a.divergences.split(",") if d.strip()]
    for d in divs:
        if d not in DIVERGENCES:
            ap.error(f"unknown divergence {d!r}; expected some of {', '.join(DIVERGENCES)}")
    impls = a.impls.split(",")

    where = torch.cuda.get_device_name(0) if gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# tokens={tokens} vocab={vocab} hidden={hidden} dtype={dtype} device={device} ({where}), torch {torch.__version__}")
    print(f"# temperature={TEMPERATURE} beta={BETA} skew={SKEW}; every case in a fresh process; "
          f"memory = peak {'allocated' if gpu else 'RSS'} growth during forward+backward")
    rows = []
    for d in divs:
        res = {}
        for impl in impls:
            spec = dict(impl=impl, divergence=d, tokens=tokens, vocab=vocab, hidden=hidden, device=device,
                        dtype_name=dtype, repeat=a.repeat)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                  capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"# {d} {impl}: failed (exit {proc.returncode}): {tail[0]}", flush=True)
                continue
            res[impl] = json.loads(line[0][len("RESULT "):])
            r = res[impl]
            cpu = f"  cpu {r['cpu_seconds']:8.2f} s" if "cpu_seconds" in r else ""
            print(f"# {d:16s} {impl:5s} peak {r['peak_mb']:9.1f} MB  time {r['seconds']:8.3f} s{cpu}  loss {r['value']:.6f}",
                  flush=True)
        rows.append((d, res))

    cols = [("peak_mb", "peak MB", ".0f", "memory"), ("seconds", "wall s", ".2f", "wall time")]
    if not gpu:
        cols.append(("cpu_seconds", "CPU s", ".1f", "CPU time"))
    head = ["divergence"]
    for _, unit, _, what in cols:
        head += [f"naive {unit}", f"fused {unit}", f"{what} fused/naive"]
    print()
    print("| " + " | ".join(head + ["loss rel. diff"]) + " |")
    print("|---|" + "---:|" * (len(head) ) )
    for d, res in rows:
        n, f = res.get("naive"), res.get("fused")
        cells = [d]
        for key, _, spec, _ in cols:
            cells += [format(n[key], spec) if n else "—", format(f[key], spec) if f else "—",
                      f"{f[key] / n[key]:.3f}" if n and f and n[key] > 0 else "—"]
        cells.append(f"{abs(f['value'] - n['value']) / max(abs(n['value']), 1e-30):.1e}" if n and f else "—")
        print("| " + " | ".join(cells) + " |")
    side = [(d, res) for d, res in rows if len(res) > 2]  # a third implementation (liger): side by side
    if side:
        print("\n| divergence | implementation | peak MB | wall s | loss |\n|---|---|---:|---:|---:|")
        for d, res in side:
            for impl, r in res.items():
                print(f"| {d} | {impl} | {r['peak_mb']:.0f} | {r['seconds']:.3f} | {r['value']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
