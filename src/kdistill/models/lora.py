"""LoRA students (``student.lora``), with the real ``peft`` library.

The student (given or cut from the teacher) is wrapped by ``peft.get_peft_model``: its own weights
are frozen and only the low-rank adapters train (plus ``modules_to_save``, peft's full trainable
copies of named modules, e.g. ``lm_head``). Every method then sees an ordinary causal LM: the
fused loss still reads the final hidden states and the output layer (unchanged unless targeted;
a targeted output layer makes the loss take the plain path), and the trainer optimizes what
requires a gradient.

Saving: ``merge: true`` (the default) folds the adapters into the weights and saves a plain model;
``merge: false`` saves the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
with its base model beside it in ``base/`` (or the ``student.model`` it came from). Stage folders
of multi-pass methods hold the adapter only (:func:`load_adapter_copy` reads it back).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdistill.errors import ConfigError


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("student.lora: needs the peft package: pip install 'kdistill[lora]'") from None
    return peft


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (duck-typed: peft need not be installed to ask)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def apply_lora(model: nn.Module, lc, seed: int = 0) -> nn.Module:
    """``model`` wrapped with LoRA adapters as ``lc`` (the ``student.lora`` section) says.

    The adapters' random start is drawn from its own generator seeded with ``seed`` (the global
    RNG is left as it was, so a run draws its batches as it would without LoRA).
    """
    peft = _peft()
    for p in model.parameters():
        p.requires_grad_(False)
    target = lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                             target_modules=target, modules_to_save=list(lc.modules_to_save) or None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = peft.get_peft_model(model, config)
        except ValueError as exc:
            raise ConfigError(f"student.lora.target_modules: {str(exc).splitlines()[0][:300]}") from None
    return wrapped


def trainable_params(model: nn.Module) -> int:
    """Parameters that receive gradients (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def base_params(model: nn.Module) -> int:
    """Parameters of the model as it is saved merged (LoRA factors not counted)."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or ".lora_" in name or "modules_to_save." in name:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def describe_lora(model: nn.Module, lc) -> dict:
    """The report's ``student.lora`` entry."""
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "target_modules": lc.target_modules,
            "modules_to_save": list(lc.modules_to_save), "merge": lc.merge, "adapter_params": adapters}


def save_lora_student(model: nn.Module, folder: Path, lc, base_source: Optional[str] = None) -> nn.Module:
    """Save a LoRA student into ``folder``; returns the model that was saved (merged or not).

    ``base_source``: where the unmodified base model already lives (a local ``student.model``
    folder or hub id); None = it is written to ``folder/base`` (a student cut from the teacher).
    """
    folder = Path(folder)
    if lc.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(folder))
        return merged
    model.save_pretrained(str(folder))
    if base_source is None:
        base = copy.deepcopy(model).unload()  # the frozen base weights, adapters removed (not merged)
        base.save_pretrained(str(folder / "base"))
        base_source = str((folder / "base").resolve())
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_source
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return model


def load_adapter_copy(like: nn.Module, folder: Path) -> nn.Module:
    """A copy of the peft model ``like`` with the adapter weights saved in ``folder`` (a stage's
    ``save_pretrained``)."""
    peft = _peft()
    from safetensors.torch import load_file

    model = copy.deepcopy(like)
    state = load_file(str(Path(folder) / "adapter_model.safetensors"), device=str(next(like.parameters()).device))
    peft.set_peft_model_state_dict(model, state)
    return model.eval()
