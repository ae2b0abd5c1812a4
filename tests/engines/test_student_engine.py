"""The colocated student engine (``engine: vllm``) on the real vLLM CPU build.

* after an optimizer step, the engine's greedy samples equal transformers' greedy samples of the
  *updated* student, token for token (float32 engine, the student's compute dtype by default);
* starting the engine and sampling from it leave the process's random state and thread count as
  they were (real vLLM re-seeds the process when it starts);
* the on_policy schedule (which batches are sampled from the student) is the same with
  ``engine: transformers`` and with ``engine: vllm`` killed mid-run and resumed (that engine in
  bfloat16, asked for: the report names the mismatch).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from conftest import base_config
from kdistill.config import load_config
from kdistill.data import collate, encode_examples, load_examples
from kdistill.methods import RunContext, build_method
from kdistill.models import StudentLM, load_model
from kdistill.sampling import sample_completions
from kdistill.teachers import LocalTeacher

QUIET = {"generate": False, "speed_prompts": 0}
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "VLLM_ENABLE_V1_MULTIPROCESSING")


def _completions(batch, prompts):
    return [batch["input_ids"][i, len(p): int(batch["attention_mask"][i].sum())].tolist() for i, p in enumerate(prompts)]


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_samples_after_an_optimizer_step_equal_transformers_greedy(models, tmp_path):
    cfg = load_config(base=base_config(models, tmp_path / "ctx", method="on_policy", eval=QUIET,
                                       on_policy={"lambda": 1.0, "temperature": 0.0, "max_new_tokens": 8,
                                                  "engine": "vllm"}))
    teacher, tok = load_model(str(models / "teacher"))
    student, _ = load_model(str(models / "student"))
    from kdistill.data import Renderer

    renderer = Renderer(tok, cfg.data.max_length)
    rows = load_examples(models / "train.jsonl")[:6]
    ctx = RunContext(cfg=cfg, tokenizer=tok, teacher=LocalTeacher(teacher, len(tok)), vocab_size=len(tok),
                     output_dir=tmp_path, renderer=renderer, train_examples=rows)
    feats, _ = encode_examples(renderer, rows)
    batch = collate(feats, tok.pad_token_id)
    prompts = [renderer.prompt_ids(e) for e in rows]
    method = build_method("on_policy", ctx)
    wrapper = StudentLM(student)

    threads = torch.get_num_threads()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    want = _draws()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    out = method.prepare_batch(batch, wrapper)  # starts the real engine, syncs the weights, samples
    assert _draws() == want and torch.get_num_threads() == threads  # vLLM re-seeded the process; undone

    def greedy():
        return sample_completions(student, tok, prompts, 8, temperature=0.0, batch_size=len(prompts))

    assert _completions(out, prompts) == greedy()
    before = greedy()
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=5e-3)
    for _ in range(3):  # a few optimizer steps on the student's own samples: its greedy answers change
        loss, _ = method.loss(wrapper, out, method.num_items(out))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = greedy()
    out2 = method.prepare_batch(batch, wrapper)
    got = _completions(out2, prompts)
    assert got == after, (got, after)
    changed = sum(a != b for a, b in zip(before, after))
    s = method.summary()
    print(f"\ncolocated vLLM greedy == transformers greedy after the update ({changed} of {len(prompts)} "
          f"completions changed by it); sync {s['engine_weight_sync']}, dtype {s['engine_dtype']}")
    assert changed > 0  # the check has teeth: the old weights would give other samples
    assert s["engine_weight_loads"] == 2 and s["engine_weight_sync"] == "reload_weights"
    assert s["engine_dtype"] == "float32" and "engine_dtype_note" not in s


CRASH = """
import os, sys
from kdistill.methods import logit
real, calls = logit.LogitMethod.loss, [0]
def crash(self, *a, **k):
    calls[0] += 1
    if calls[0] == int(os.environ["KD_CRASH_AT"]):
        os._exit(9)  # as kill -9: no cleanup
    return real(self, *a, **k)
logit.LogitMethod.loss = crash
from kdistill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kdistill(cfg: dict, path: Path, crash_at: int = 0) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(cfg))
    # a fresh process, as after a restart: not the launcher variables this process's own engine set
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(KD_CRASH_AT=str(crash_at), VLLM_CPU_KVCACHE_SPACE="1")
    args = ["run", str(path), "--no-progress"]
    cmd = [sys.executable, "-c", CRASH, *args] if crash_at else [sys.executable, "-m", "kdistill", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)


def _schedule(out: Path) -> list[float]:
    return [json.loads(l)["on_policy"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_schedule_same_with_transformers_and_a_killed_and_resumed_vllm_run(models, tmp_path):
    common = dict(method="on_policy", eval=QUIET, data={"max_eval_rows": 4},
                  train={"max_steps": 8, "batch_size": 4, "save_every": 2})
    hf = base_config(models, tmp_path / "hf", **common,
                     on_policy={"lambda": 0.5, "temperature": 1.0, "max_new_tokens": 4})
    r = _kdistill(hf, tmp_path / "hf.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    # the engine in bfloat16, asked for: the schedule must not care, and the report must say so
    vl = base_config(models, tmp_path / "vllm", **common, vllm={"dtype": "bfloat16"},
                     on_policy={"lambda": 0.5, "temperature": 1.0, "max_new_tokens": 4, "engine": "vllm"})
    r = _kdistill(vl, tmp_path / "vllm.yaml", crash_at=5)
    assert r.returncode == 9, r.stderr[-3000:]
    r = _kdistill(vl, tmp_path / "vllm.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "vllm" / "report.json").read_text())
    assert rep["training"]["resumed_from"] == 4
    want = _schedule(tmp_path / "hf")
    print(f"\non_policy schedule (1 = student-sampled): {want}")
    assert _schedule(tmp_path / "vllm") == want and 0.0 in want and 1.0 in want
    s = rep["method_summary"]
    assert s["engine"] == "vllm" and s["engine_weight_sync"] == "reload_weights" and s["engine_dtype"] == "bfloat16"
    assert "approximately on-policy" in s["engine_dtype_note"] and "float32" in s["engine_dtype_note"]
