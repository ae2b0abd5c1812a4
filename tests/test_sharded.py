"""Sharded training's teacher: FSDP2 (``fully_shard``) on 2 CPU processes (torchrun, gloo).

The teacher is prepared for inference only — no gradients, no optimizer — and sharded like the
student (``teacher.placement: auto``) or kept whole (``replicated``); its logits and its signal to
the loss are the same as the unsharded teacher's. accelerate 1.15 does not enable its FSDP plugin
on CPU processes (they stay MULTI_CPU), so the whole ``accelerate launch`` run with
``examples/accelerate/fsdp2.yaml`` / ``accelerate/zero3.yaml`` (student sharded, full checkpoint
gathered at the end) is checked on a GPU by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_distributed import _port

WORKER = r"""
import json, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
from kdistill.models import load_model
from kdistill.sharding import describe, prepare_teacher
from kdistill.teachers import LocalTeacher

class Acc:  # what kdistill.sharding reads of an accelerate.Accelerator launched with FSDP2
    distributed_type, device, mixed_precision = "DistributedType.FSDP", torch.device("cpu"), "no"
    num_processes = dist.get_world_size()

folder, out = sys.argv[1:3]
ref, tok = load_model(folder)
ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]] * 2)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
with torch.no_grad():
    want = ref(input_ids=ids).logits
    plain = LocalTeacher(ref, len(tok)).signal(batch, hidden=False).logits
result = {}
for placement in ("auto", "replicated"):
    model, _ = load_model(folder)
    teacher = LocalTeacher(prepare_teacher(model, Acc(), placement), len(tok))
    with torch.no_grad():
        sig = teacher.signal(batch)  # the loss path (sharded: logits from the teacher's own forward)
    logits = sig.logits if sig.logits is not None else sig.hidden @ sig.weight.T
    result[placement] = {"diff": float((logits - want).abs().max()), "diff_plain": float((logits - plain).abs().max()),
                         "fused": teacher.can_fuse, "grad": any(p.requires_grad for p in teacher.model.parameters()),
                         "dtensor": type(next(teacher.model.parameters())).__name__, **describe(Acc(), teacher.model)}
json.dump(result, open(f"{out}.{dist.get_rank()}", "w"))
"""


def test_fsdp2_teacher_on_two_cpu_processes(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "rank"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(_worker(tmp_path)), str(tiny / "teacher"), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank.{rank}").read_text())
        for placement, got in result.items():
            assert got["diff"] < 1e-4 and got["diff_plain"] < 1e-4  # the same logits, sharded or not
            assert not got["grad"] and got["scheme"] == "fsdp" and got["processes"] == 2
            if placement == "auto":
                assert got["teacher"] == "sharded" and got["dtensor"] == "DTensor" and not got["fused"]
                assert got["teacher_params_this_process"] * 2 == got["teacher_params"]  # each holds half
            else:
                assert got["teacher"] == "replicated" and got["fused"]
                assert got["teacher_params_this_process"] == got["teacher_params"]


def _worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path
