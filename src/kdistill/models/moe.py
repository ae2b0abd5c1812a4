"""Mixture-of-experts teachers: active vs total parameters, and dense students made from them.

transformers (5.x) gives every MoE architecture it ships (Mixtral, Qwen2/3-MoE, OLMoE, ...) the
same block: ``mlp.gate`` (a router, ``weight [experts, hidden]``, ``top_k``) and ``mlp.experts``
(``gate_up_proj [experts, 2·inter, hidden]``, ``down_proj [experts, hidden, inter]``). Such a
teacher needs nothing special to *teach* (its logits and hidden states are a causal LM's); this
module is about counting and about *initialising* a dense student from it.

**Dense initialisation: each block's most-used expert.** A dense student (Mixtral -> Mistral,
Qwen3-MoE -> Qwen3: the same attention, norms and embeddings) takes, in every block, the MLP of
the expert with the largest mean router probability on sample training rows. Why one expert and
not the router-weighted average of the experts' weights: experts are trained apart, so their
hidden units are not aligned — the average of two MLPs' weights is not the average of their
functions (for SiLU-gated MLPs it is close to neither). The most-used expert is a real function
the teacher computes, on the largest share of its tokens; distillation then teaches it the rest.
When all experts are equal the dense student equals the teacher exactly (tested).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from kdistill.errors import ModelError
from kdistill.models.introspect import carry_rest, count_params, decoder_layers

#: The dense architecture a MoE's blocks become (same attention, norms, embeddings and MLP form).
DENSE_OF = {"mixtral": "mistral", "qwen3_moe": "qwen3"}
#: MoE-only config keys a dense config does not take.
_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits",
             "router_jitter_noise", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
             "shared_expert_intermediate_size", "model_type", "architectures", "transformers_version", "auto_map",
             "dtype", "torch_dtype")


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks of ``model`` (modules with a router ``gate`` and ``experts``)."""
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")
            and hasattr(m.experts, "num_experts")]


def is_moe(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def _top_k(block: nn.Module) -> int:
    return int(getattr(block.gate, "top_k", None) or getattr(block, "top_k"))


def param_counts(model: nn.Module) -> dict:
    """``{"params": total, "params_active": per token}``; for a MoE also ``experts`` and
    ``experts_per_token``. Active = total − Σ_blocks expert weights · (1 − top_k / experts); shared
    experts and routers count as active."""
    total = count_params(model)
    blocks = moe_blocks(model)
    if not blocks:
        return {"params": total, "params_active": total}
    idle = 0.0
    for b in blocks:
        e, k = int(b.experts.num_experts), _top_k(b)
        idle += sum(p.numel() for p in b.experts.parameters()) * (1 - k / e)
    b0 = blocks[0]
    return {"params": total, "params_active": int(round(total - idle)), "experts": int(b0.experts.num_experts),
            "experts_per_token": _top_k(b0)}


@torch.no_grad()
def expert_usage(model: nn.Module, batches: Sequence[dict]) -> list[list[float]]:
    """Mean router probability of every expert, per block, over the unmasked tokens of ``batches``
    (``[blocks][experts]``; a dense block gets an empty list)."""
    layers = decoder_layers(model)
    sums: list[Optional[torch.Tensor]] = [None] * len(layers)
    mask: dict = {}
    handles = []

    def hook(i):
        def fn(_mod, _args, out):
            logits = out[0] if isinstance(out, tuple) else out
            probs = torch.softmax(logits.float(), dim=-1)[mask["m"].reshape(-1)]
            s = probs.double().sum(0)
            sums[i] = s if sums[i] is None else sums[i] + s
        return fn

    for i, blk in enumerate(layers):
        mlp = getattr(blk, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "experts"):
            handles.append(mlp.gate.register_forward_hook(hook(i)))
    count = 0
    try:
        for b in batches:
            mask["m"] = b["attention_mask"].bool()
            model.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            count += int(mask["m"].sum())
    finally:
        for h in handles:
            h.remove()
    return [[] if s is None else (s / max(count, 1)).tolist() for s in sums]


def top_experts(usage: list[list[float]]) -> list[Optional[int]]:
    """Per block, the expert with the largest mean router probability (None for a dense block)."""
    return [max(range(len(u)), key=lambda e: u[e]) if u else None for u in usage]


def dense_config(config):
    """The dense twin of a MoE config (same sizes; ``intermediate_size`` = one expert's)."""
    from transformers import CONFIG_MAPPING

    kind = getattr(config, "model_type", "?")
    if kind not in DENSE_OF:
        raise ModelError(f"student.init.moe: a dense student can be made from {', '.join(DENSE_OF)} teachers, not "
                         f"{kind!r} (give student.model, or student.init.moe: keep)")
    d = config.to_dict()
    inter = d.get("moe_intermediate_size") or d["intermediate_size"]
    if d.get("mlp_only_layers") or (d.get("decoder_sparse_step") or 1) != 1:
        raise ModelError("student.init.moe: the teacher mixes dense and sparse blocks of different sizes; "
                         "dense: needs every block sparse")
    for k in _MOE_KEYS:
        d.pop(k, None)
    d["intermediate_size"] = inter
    return CONFIG_MAPPING[DENSE_OF[kind]](**d)


@torch.no_grad()
def densify(model: nn.Module, experts: Sequence[int]) -> nn.Module:
    """A dense model whose block ``i`` has the MLP of expert ``experts[i]`` of ``model``'s block ``i``
    (everything else copied). ``model`` is not changed."""
    from transformers import AutoModelForCausalLM

    cfg = dense_config(model.config)
    for attr in ("kdistill_teacher_layers",):
        if hasattr(model.config, attr):
            setattr(cfg, attr, getattr(model.config, attr))
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(cfg)
    device = next(model.parameters()).device
    dense = dense.to_empty(device=device)
    if getattr(cfg, "tie_word_embeddings", False):
        dense.tie_weights()  # before copying: the output layer is the embedding
    src = dict(model.named_parameters(remove_duplicate=False))
    inter = int(cfg.intermediate_size)
    for name, p in dense.named_parameters():
        if ".mlp." in name:
            i = int(name.split("layers.")[1].split(".")[0])
            base = name.split(".mlp.")[0] + ".mlp.experts."
            e = experts[i]
            if name.endswith("gate_proj.weight"):
                t = src[base + "gate_up_proj"][e][:inter]
            elif name.endswith("up_proj.weight"):
                t = src[base + "gate_up_proj"][e][inter:]
            elif name.endswith("down_proj.weight"):
                t = src[base + "down_proj"][e]
            else:
                raise ModelError(f"student.init.moe: no expert weight for {name}")
        elif name in src:
            t = src[name]
        else:
            raise ModelError(f"student.init.moe: {type(model).__name__} has no parameter {name}")
        if t.shape != p.shape:
            raise ModelError(f"student.init.moe: {name}: shape {tuple(t.shape)} vs {tuple(p.shape)}")
        p.copy_(t)
    return carry_rest(model, dense, "student.init.moe")
