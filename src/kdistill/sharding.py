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

After training, :func:`whole_student` gathers the student's shards (a collective) into an ordinary
model on every process: the final figures use it and the main process saves it with
``save_pretrained``, so the saved student is always a normal full checkpoint.
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


def _prepared(acc, wrapper: nn.Module) -> nn.Module:
    """What accelerate made of ``wrapper`` (DeepSpeed: its engine; FSDP2: the module itself)."""
    found = [m for m in getattr(acc, "_models", []) if m is wrapper or getattr(m, "module", None) is wrapper]
    return found[-1] if found else wrapper


def whole_student(acc, wrapper: nn.Module, student: nn.Module) -> nn.Module:
    """The trained student as a whole, ordinary model on every process (for the final figures and
    the saved checkpoint): under FSDP2 / ZeRO-3 its shards are gathered (a collective: call it on
    every process) into a fresh copy; otherwise ``student`` itself.

    ``wrapper`` is the :class:`~kdistill.models.StudentLM` that was trained (its student is ``.model``).
    """
    import torch

    how = scheme(acc)
    if how not in ("fsdp", "zero3"):
        return student
    prepared = _prepared(acc, wrapper)
    if how == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(prepared, options=StateDictOptions(full_state_dict=True))
    else:
        import deepspeed

        module = getattr(prepared, "module", prepared)
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    prefix = "model."  # StudentLM keeps the student as .model (feature adapters as .extra: not part of it)
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    with torch.device(acc.device):  # built where it will run (its buffers, e.g. rotary tables, computed there)
        fresh = type(student)(student.config).to(dtype)
    fresh.load_state_dict(state)
    fresh.generation_config = student.generation_config
    return fresh.eval()


def describe(acc, teacher: Optional[nn.Module]) -> dict:
    """For the report: the scheme, and how much of the teacher each process holds."""
    out = {"scheme": scheme(acc), "processes": acc.num_processes}
    if teacher is not None:
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in teacher.parameters())
        total = sum(int(getattr(p, "ds_numel", 0)) or p.numel() for p in teacher.parameters())
        out.update(teacher="sharded" if is_sharded(teacher) else "replicated", teacher_params=total,
                   teacher_params_this_process=local)
    return out
