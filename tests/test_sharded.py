"""Sharded training: FSDP2 (``fully_shard``) on 2 CPU processes (torchrun, gloo).

The teacher is prepared for inference only — no gradients, no optimizer — and sharded like the
student (``teacher.placement: auto``) or kept whole (``replicated``); its logits and its signal to
the loss are the same as the unsharded teacher's. A student sharded as accelerate's FSDP2 leaves it
is gathered into an ordinary model on every process, equal to the original (what is saved). accelerate 1.15 does not enable its FSDP plugin
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

# the student as accelerate's FSDP2 leaves it (blocks and the StudentLM root fully_shard-ed), gathered whole
from torch.distributed.fsdp import fully_shard
from kdistill.models import StudentLM, decoder_layers
from kdistill.sharding import whole_student

student, _ = load_model(folder)
want_state = {k: v.clone() for k, v in student.state_dict().items()}
with torch.no_grad():
    want_gen = student.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).tolist()
wrapper = StudentLM(student)
for block in decoder_layers(student):
    fully_shard(block)
fully_shard(wrapper)
acc = Acc()
acc._models = [wrapper]
sharded = type(next(wrapper.parameters())).__name__
whole = whole_student(acc, wrapper, student)
got = whole.state_dict()
with torch.no_grad():
    gen = whole.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).tolist()
result["student"] = {"sharded": sharded, "whole": type(next(whole.parameters())).__name__,
                     "same_keys": set(got) == set(want_state),
                     "equal": all(torch.equal(got[k], want_state[k]) for k in want_state), "generates": gen == want_gen}
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
        st = result.pop("student")  # gathered from its FSDP2 shards into an ordinary model, on every process
        assert st == {"sharded": "DTensor", "whole": "Parameter", "same_keys": True, "equal": True, "generates": True}
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
