"""Width pruning (Minitron-style): keep the most active MLP channels, attention-head groups and
hidden (embedding) channels of a decoder, and build a smaller model of the same class.

Importance is *activation-based and gradient-free* (Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation"), measured by forward passes on sample training
rows, padded positions excluded:

* **MLP channel** ``j`` of block ``l``: mean over tokens of ``|a_j|``, ``a = act(gate(x)) · up(x)``
  (the input of ``down_proj``): a channel that is rarely active adds little to the block's output;
* **attention head group** ``g`` of block ``l`` (one KV head and the query heads that share it, so
  grouped-query attention stays valid): the sum over its query heads of the mean over tokens of
  the L2 norm of the head's output (its slice of the input of ``o_proj``);
* **hidden channel** ``c`` (the residual stream, embeddings included): the sum over the kept
  blocks' two RMSNorm outputs and the final norm's of mean ``|x_c|``.

Every block keeps the same number of channels and groups (a transformers config has one
``intermediate_size`` and one head count) but its own choice of which. The pruned model has an
explicit ``head_dim`` (unchanged), so it loads with plain ``AutoModelForCausalLM.from_pretrained``.
With every fraction 1.0 the pruned model is the input model, output for output.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from kdistill.errors import ModelError
from kdistill.models.introspect import carry_rest, decoder_layers

#: Architectures whose blocks are Llama-shaped (q/k/v/o, gate/up/down, RMSNorm) and whose forward
#: depends on the config only through the sizes rewritten here (no embedding scale by width).
WIDTH_TYPES = ("llama", "mistral", "qwen2", "qwen3")
AXES = ("mlp", "heads", "hidden")


def check_prunable(model: nn.Module) -> None:
    """Refuse, with one line, a model whose width cannot be pruned here."""
    kind = getattr(model.config, "model_type", "?")
    if kind not in WIDTH_TYPES:
        raise ModelError(f"student.init.width: width pruning supports {', '.join(WIDTH_TYPES)} models "
                         f"(and mixture-of-experts teachers made dense with student.init.moe: dense), not {kind!r}")


def _geometry(model: nn.Module) -> dict:
    c = model.config
    heads, kv = int(c.num_attention_heads), int(c.num_key_value_heads or c.num_attention_heads)
    return {"hidden": int(c.hidden_size), "mlp": int(c.intermediate_size), "heads": heads, "kv": kv,
            "group": heads // kv, "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // heads)}


@torch.no_grad()
def width_scores(model: nn.Module, batches: Sequence[dict]) -> dict:
    """Activation importance on ``batches`` (dicts with ``input_ids``/``attention_mask`` ``[B, T]``).

    Returns ``{"mlp": [blocks, intermediate], "heads": [blocks, kv groups], "hidden": [blocks, hidden],
    "final": [hidden]}`` (float64, means over unmasked tokens; ``hidden`` sums a block's two norms).
    """
    check_prunable(model)
    g, layers = _geometry(model), decoder_layers(model)
    n = len(layers)
    sums = {"mlp": torch.zeros(n, g["mlp"], dtype=torch.float64), "heads": torch.zeros(n, g["kv"], dtype=torch.float64),
            "hidden": torch.zeros(n, g["hidden"], dtype=torch.float64),
            "final": torch.zeros(g["hidden"], dtype=torch.float64)}
    mask: dict = {}

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x[mask["m"]].double() if x.dim() == 3 else x.double()

    def add(key: str, i: Optional[int], fn):
        def hook(_mod, args, out=None):
            x = rows(args[0] if out is None else (out[0] if isinstance(out, tuple) else out))
            v = fn(x)
            if i is None:
                sums[key] += v
            else:
                sums[key][i] += v
        return hook

    def head_norms(x: torch.Tensor) -> torch.Tensor:  # [N, heads*hd] -> [kv groups]
        per_head = x.view(x.shape[0], g["heads"], g["head_dim"]).norm(dim=-1).sum(0)
        return per_head.view(g["kv"], g["group"]).sum(-1)

    handles = []
    try:
        for i, blk in enumerate(layers):
            handles.append(blk.mlp.down_proj.register_forward_pre_hook(add("mlp", i, lambda x: x.abs().sum(0))))
            handles.append(blk.self_attn.o_proj.register_forward_pre_hook(add("heads", i, head_norms)))
            for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                handles.append(norm.register_forward_hook(add("hidden", i, lambda x: x.abs().sum(0))))
        decoder = model.get_decoder()
        handles.append(decoder.norm.register_forward_hook(add("final", None, lambda x: x.abs().sum(0))))
        count = 0
        for b in batches:
            mask["m"] = b["attention_mask"].bool()
            decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            count += int(mask["m"].sum())
    except AttributeError as exc:
        raise ModelError(f"student.init.width: {type(model).__name__} does not have Llama-shaped blocks ({exc})") from None
    finally:
        for h in handles:
            h.remove()
    return {k: v / max(count, 1) for k, v in sums.items()}


def keep_count(total: int, fraction: float, multiple: int = 1) -> int:
    """How many of ``total`` units a keep ``fraction`` keeps (at least one; a multiple of ``multiple``
    when that is possible)."""
    k = max(1, round(total * fraction))
    if multiple > 1 and total % multiple == 0:
        k = max(multiple, round(k / multiple) * multiple)
    return min(total, k)


def keep_sizes(model: nn.Module, fractions: dict) -> dict:
    """``{axis: units kept}`` for keep ``fractions``: MLP channels a multiple of 8 (when there are at
    least 128), KV-head groups at least one, hidden channels a multiple of the pruned model's query
    head count (transformers' Llama config requires ``hidden_size % num_attention_heads == 0``)."""
    g = _geometry(model)
    sizes = {}
    if fractions.get("mlp") is not None:
        sizes["mlp"] = keep_count(g["mlp"], fractions["mlp"], 8 if g["mlp"] >= 128 else 1)
    if fractions.get("heads") is not None:
        sizes["heads"] = keep_count(g["kv"], fractions["heads"])
    if fractions.get("hidden") is not None:
        heads = sizes.get("heads", g["kv"]) * g["group"]
        sizes["hidden"] = keep_count(g["hidden"], fractions["hidden"], heads)
    return sizes


def width_plan(model: nn.Module, scores: dict, layers: Sequence[int], fractions: dict) -> dict:
    """Which channels and groups a student keeps: ``{axis: {"fraction", "size", "keep"}}``.

    ``layers``: the teacher blocks the student keeps (the hidden score sums those blocks' norms and
    the final norm). ``keep`` is per kept block (``mlp``: channels, ``heads``: KV-head groups) or one
    sorted list (``hidden``). Axes missing from ``fractions`` (or None) are not pruned.
    """
    plan: dict = {}
    for axis, k in keep_sizes(model, fractions).items():
        if axis == "hidden":
            score = scores["hidden"][list(layers)].sum(0) + scores["final"]
            keep = sorted(score.topk(k).indices.tolist())
        else:
            keep = [sorted(scores[axis][i].topk(k).indices.tolist()) for i in layers]
        plan[axis] = {"fraction": fractions[axis], "size": k, "keep": keep}
    return plan


def pruned_config(config, plan: dict, geometry: Optional[dict] = None):
    """A copy of ``config`` with the sizes of ``plan`` (``head_dim`` written out, unchanged)."""
    g = geometry or {"hidden": config.hidden_size, "mlp": config.intermediate_size, "heads": config.num_attention_heads,
                     "kv": config.num_key_value_heads or config.num_attention_heads}
    cfg = copy.deepcopy(config)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    group = int(g["heads"]) // int(g["kv"])
    cfg.head_dim = head_dim
    if "hidden" in plan:
        cfg.hidden_size = plan["hidden"]["size"]
    if "mlp" in plan:
        cfg.intermediate_size = plan["mlp"]["size"]
    if "heads" in plan:
        cfg.num_key_value_heads = plan["heads"]["size"]
        cfg.num_attention_heads = plan["heads"]["size"] * group
    return cfg


def _rows_of(groups: list[int], per: int) -> torch.Tensor:
    """Indices of the ``per``-long row blocks of ``groups`` (heads -> rows of a projection)."""
    return torch.tensor([gi * per + j for gi in groups for j in range(per)], dtype=torch.long)


def _slice(name: str, t: torch.Tensor, plan: dict, g: dict) -> torch.Tensor:
    """The part of parameter ``name`` (of the unpruned model) that the pruned model keeps."""
    hid = torch.tensor(plan["hidden"]["keep"]) if "hidden" in plan else None
    layer = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else None

    def cols(x):
        return x if hid is None else x.index_select(-1, hid)

    def rows(x, idx):
        return x if idx is None else x.index_select(0, idx)

    heads = plan.get("heads")
    kv = heads["keep"][layer] if heads and layer is not None else None
    q_rows = _rows_of([k * g["group"] + j for k in kv for j in range(g["group"])], g["head_dim"]) if kv else None
    kv_rows = _rows_of(kv, g["head_dim"]) if kv else None
    mlp = torch.tensor(plan["mlp"]["keep"][layer]) if "mlp" in plan and layer is not None else None
    leaf = name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return cols(t)
    if leaf in ("input_layernorm.weight", "post_attention_layernorm.weight") or name.endswith("model.norm.weight"):
        return rows(t, hid)
    if leaf in ("q_norm.weight", "k_norm.weight"):  # per head_dim (Qwen3): unchanged
        return t
    if leaf in ("q_proj.weight", "q_proj.bias"):
        return cols(rows(t, q_rows)) if t.dim() == 2 else rows(t, q_rows)
    if leaf in ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"):
        return cols(rows(t, kv_rows)) if t.dim() == 2 else rows(t, kv_rows)
    if leaf == "o_proj.weight":
        return rows(t, hid).index_select(1, q_rows) if q_rows is not None else rows(t, hid)
    if leaf == "o_proj.bias":
        return rows(t, hid)
    if leaf in ("gate_proj.weight", "up_proj.weight"):
        return cols(rows(t, mlp))
    if leaf == "down_proj.weight":
        return rows(t, hid) if mlp is None else rows(t, hid).index_select(1, mlp)
    return t


@torch.no_grad()
def prune_width(model: nn.Module, plan: dict) -> nn.Module:
    """A new model of ``model``'s class with only the channels and groups in ``plan`` (block ``i`` of
    ``model`` uses ``plan[axis]["keep"][i]``). ``model`` is not changed."""
    check_prunable(model)
    if not plan:
        return model
    g = _geometry(model)
    cfg = pruned_config(model.config, plan, g)
    with torch.device("meta"):  # no random init: every parameter and buffer is copied below
        new = type(model)(cfg)
    new = new.to_empty(device=next(model.parameters()).device)
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()  # before copying: the output layer is the embedding
    src = dict(model.named_parameters(remove_duplicate=False))
    for name, p in new.named_parameters():
        if name not in src:
            raise ModelError(f"student.init.width: {type(model).__name__} has no parameter {name} to prune")
        part = _slice(name, src[name].detach(), plan, g)
        if part.shape != p.shape:
            raise ModelError(f"student.init.width: cannot prune {name} of {type(model).__name__} "
                             f"({tuple(part.shape)} vs {tuple(p.shape)})")
        p.copy_(part)
        p.requires_grad_(src[name].requires_grad)
    return carry_rest(model, new, "student.init.width")


def count_pruned(model: nn.Module, layers: Sequence[int], fractions: dict) -> int:
    """Parameters of ``model`` cut to ``layers`` and pruned to ``fractions``, without building it:
    one- and two-block models are built on the meta device (nothing allocated) and the count
    extrapolated, as every block of a config has the same size."""
    g = _geometry(model)
    plan = {axis: {"size": k} for axis, k in keep_sizes(model, fractions).items()}
    cfg = pruned_config(model.config, plan, g)
    counts = []
    for n in (1, 2):
        cfg.num_hidden_layers = n
        if isinstance(getattr(model.config, "layer_types", None), list):
            cfg.layer_types = list(model.config.layer_types[:n])
        with torch.device("meta"):
            m = type(model)(cfg)
        counts.append(sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()))
    return counts[0] + (len(layers) - 1) * (counts[1] - counts[0])


def describe_width(plan: dict, geometry_of: nn.Module) -> dict:
    """``{axis: {"fraction", "size", "of"}}`` for reports (no index lists)."""
    g = _geometry(geometry_of)
    of = {"hidden": g["hidden"], "mlp": g["mlp"], "heads": g["kv"]}
    return {a: {"fraction": v["fraction"], "size": v["size"], "of": of[a]} for a, v in plan.items()}
