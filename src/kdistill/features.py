"""Feature (hidden-state) distillation: block outputs of the student matched to the teacher's.

Added to the ``logit`` / ``on_policy`` loss when ``features.weight > 0`` (see
:class:`kdistill.config.FeaturesConfig`). For each ``(student block, teacher block)`` pair, on the
positions whose next token is trained (``labels != -100``, as the logit loss):

* ``cosine``: ``1 − cos(A·s, t)`` per position;
* ``mse``: ``mean_d (A·s − t)²`` per position, after a parameter-free layer norm of both sides
  (``normalize``; LLM activations differ in scale across layers and models by orders of magnitude).

``A`` is identity when the widths match, else a linear adapter ``[teacher_hidden, student_hidden]``
trained with the student (TinyBERT / FitNets-style projection) and dropped when the student is
saved. The term is ``weight · Σ_pairs Σ_positions loss / (pairs · num_items)``: the same global
token count as the divergence, so accumulation and data parallelism keep their exactness.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.data import IGNORE_INDEX


def num_blocks(model: nn.Module) -> int:
    return int(getattr(model.config, "num_hidden_layers", 0) or len(model.get_decoder().layers))


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def layer_map(setting, student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    """``[(student block, teacher block)]`` for ``features.layers`` (``"auto"`` or explicit pairs).

    ``auto``: a student cut from this teacher (its config records ``kdistill_teacher_layers``)
    pairs each block with the teacher block it was copied from; any other student spreads its
    blocks evenly over the teacher's, the last onto the last.
    """
    n_s, n_t = num_blocks(student), num_blocks(teacher)
    if setting == "auto":
        kept = getattr(student.config, "kdistill_teacher_layers", None)
        if kept and len(kept) == n_s and max(kept) < n_t:
            return [(i, int(t)) for i, t in enumerate(kept)]
        return [(i, round((i + 1) * n_t / n_s) - 1) for i in range(n_s)]
    pairs = [(int(a), int(b)) for a, b in setting]
    for a, b in pairs:
        if not (0 <= a < n_s and 0 <= b < n_t):
            raise ValueError(f"features.layers: pair [{a}, {b}] is out of range (student blocks 0..{n_s - 1}, "
                             f"teacher blocks 0..{n_t - 1})")
    if not pairs:
        raise ValueError("features.layers: give at least one [student_block, teacher_block] pair (or auto)")
    return pairs


class FeatureAdapters(nn.Module):
    """One bias-free linear map per student block whose width differs from its teacher block's."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_hidden: int, teacher_hidden: int, seed: int = 0):
        super().__init__()
        self.maps = nn.ModuleDict()
        if student_hidden != teacher_hidden:
            g = torch.Generator().manual_seed(seed)  # the same start however many processes run
            for s, _ in pairs:
                lin = nn.Linear(student_hidden, teacher_hidden, bias=False)
                with torch.no_grad():
                    nn.init.orthogonal_(lin.weight, generator=g)  # a norm-preserving start
                self.maps[str(s)] = lin

    def forward(self, block: int, x: torch.Tensor) -> torch.Tensor:
        m = self.maps[str(block)] if str(block) in self.maps else None
        return x if m is None else m(x.to(m.weight.dtype))


def feature_loss(
    student_feats: dict,
    teacher_feats: dict,
    pairs: Sequence[tuple[int, int]],
    labels: torch.Tensor,
    num_items,
    adapters: Optional[nn.Module] = None,
    kind: str = "cosine",
    normalize: bool = True,
) -> torch.Tensor:
    """Mean over pairs of ``Σ_positions loss / num_items`` (float32 scalar).

    Args:
        student_feats / teacher_feats: ``{block: [batch, seq, hidden]}`` (teacher: no gradient).
        pairs: ``[(student block, teacher block)]``.
        labels: ``[batch, seq]`` aligned with the positions; -100 positions are not matched.
        num_items: the global count of trained positions (the divergence's denominator).
        adapters: :class:`FeatureAdapters` (or None: widths must match).
    """
    rows = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)
    total = torch.zeros((), dtype=torch.float32, device=labels.device)
    for s_block, t_block in pairs:
        s = student_feats[s_block]
        s = s.reshape(-1, s.shape[-1]).index_select(0, rows)
        t = teacher_feats[t_block].detach()
        t = t.reshape(-1, t.shape[-1]).index_select(0, rows).float()
        if adapters is not None:
            s = adapters(s_block, s)
        s = s.float()
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"features: student block {s_block} has width {s.shape[-1]}, teacher block {t_block} "
                             f"{t.shape[-1]}, and no adapter maps one onto the other")
        if kind == "cosine":
            per = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
        elif kind == "mse":
            if normalize:
                s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
            per = (s - t).pow(2).mean(-1)
        else:
            raise ValueError(f"features.loss: unknown {kind!r} (cosine or mse)")
        total = total + per.sum()
    return total / (len(pairs) * torch.as_tensor(num_items, dtype=torch.float32, device=labels.device).clamp(min=1.0))
