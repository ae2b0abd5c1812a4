"""Sharded training (``accelerate launch`` with FSDP2 or DeepSpeed ZeRO-3): the teacher and the saved student.

accelerate shards the *student* (parameters, gradients, optimizer state) when it is prepared. The
teacher is never prepared for training: it gets no optimizer state and no gradients, and under a
sharding scheme it is either

* **sharded** (``teacher.placement: auto``, the default under FSDP2 / ZeRO-3): FSDP2's
  ``fully_shard`` per decoder block and at the root, or a ZeRO-3 inference engine
  (``deepspeed.initialize`` without an optimizer) — each process holds 1/N of its weights and
  they are gathered block by block during its forward; or
* **replicated** (``teacher.placement: replicated``): a full copy on every process (fastest when it fits).

Peers' users hit this failure most: a teacher left unprepared under ZeRO-3 whose parameters were
partitioned at load time (``zero3_init_flag: true``) is a set of empty tensors. The example
configs (``examples/accelerate/*.yaml``) load weights whole (``zero3_init_flag: false``,
``fsdp_cpu_ram_efficient_loading: false``) because the student may be cut from the teacher's
layers. A sharded teacher's head is not read outside its forward (no fused loss path on its side):
its logits come from its own forward. Every process must run the same teacher and student
forwards (they gather weights together), so the run measures speed on every process then.

The saved student is always a normal full checkpoint: :func:`full_state_dict` gathers it on every
process (a collective) and the main process writes it with ``save_pretrained``.
"""

from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from kdistill.models.introspect import decoder_layers

SHARDED_ATTR = "kdistill_sharded"  # set on a teacher whose weights are sharded across processes


def scheme(acc) -> str:
    """``"fsdp"``, ``"zero3"``, ``"deepspeed"`` (stages 0-2), ``"ddp"`` or ``"none"`` for an accelerator."""
    kind = str(getattr(acc, "distributed_type", "NO")).split(".")[-1].upper()
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        ds = acc.state.deepspeed_plugin.deepspeed_config
        return "zero3" if int(ds.get("zero_optimization", {}).get("stage", 0)) == 3 else "deepspeed"
    return "ddp" if getattr(acc, "num_processes", 1) > 1 else "none"


def shards_models(acc) -> bool:
    """Whether the student's (and so possibly the teacher's) weights are split across processes."""
    return scheme(acc) in ("fsdp", "zero3")


def is_sharded(model: Optional[nn.Module]) -> bool:
    return model is not None and bool(getattr(model, SHARDED_ATTR, False))


def prepare_teacher(model: nn.Module, acc, placement: str = "auto") -> nn.Module:
    """The teacher for inference under ``acc``: eval mode, no gradients, no optimizer; sharded the
    way the student is (``placement: auto`` under FSDP2 / ZeRO-3) or whole on every process."""
    model.eval()
    model.requires_grad_(False)
    model.to(acc.device)
    how = scheme(acc)
    if placement == "replicated" or how not in ("fsdp", "zero3"):
        return model
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in decoder_layers(model):
            fully_shard(block, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)  # the root too: nothing stays whole between forwards
    else:
        import deepspeed

        ds = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
        zero = {k: v for k, v in ds.get("zero_optimization", {}).items() if k != "offload_optimizer"}
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {**zero, "stage": 3}}
        if acc.mixed_precision in ("bf16", "fp16"):
            config[acc.mixed_precision] = {"enabled": True}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        model = engine.module  # its parameters are partitioned; hooks gather them in each forward
    setattr(model, SHARDED_ATTR, True)
    return model


def full_state_dict(acc, wrapper: nn.Module) -> Optional[dict]:
    """The student's full state dict (names as in the unwrapped model), gathered from every process:
    call it on *all* processes; the main process gets the dict, the others may get None."""
    prepared = [m for m in getattr(acc, "_models", []) if m is wrapper or getattr(m, "module", None) is wrapper]
    state = acc.get_state_dict(prepared[-1] if prepared else wrapper)  # DeepSpeed wants its engine
    if state is None:
        return None
    prefix = "model."  # kdistill.models.StudentLM keeps the student as .model (adapters as .extra: not saved)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def describe(acc, teacher: Optional[nn.Module]) -> dict:
    """For the report: the scheme, and how much of the teacher each process holds."""
    out = {"scheme": scheme(acc), "processes": acc.num_processes}
    if teacher is not None:
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in teacher.parameters())
        total = sum(int(getattr(p, "ds_numel", 0)) or p.numel() for p in teacher.parameters())
        out.update(teacher="sharded" if is_sharded(teacher) else "replicated", teacher_params=total,
                   teacher_params_this_process=local)
    return out
