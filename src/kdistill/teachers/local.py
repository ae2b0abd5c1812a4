"""A teacher model loaded next to the student (frozen, no gradients): every kind of signal."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.errors import ConfigError, ModelError
from kdistill.models import (block_outputs, check_vocab, count_params, decoder_states, final_hidden, load_model,
                             supports_hidden, tokenizer_fingerprint)
from kdistill.sharding import is_sharded
from kdistill.models.introspect import forward_inputs
from kdistill.teachers.base import Teacher, TeacherSignal, register_teacher
from kdistill.throughput import clock, linear_params


@torch.no_grad()
def model_topk(model: nn.Module, batch: dict, vocab_size: int, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs (T = 1, sorted) of ``model`` at the positions of ``batch`` with a label.

    Returns ``([N, k] long, [N, k] float32)``, rows in row-major order of ``labels != -100``.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    keep = labels != IGNORE_INDEX
    if supports_hidden(model):
        h = final_hidden(model, ids, mask)[keep]
        w = model.get_output_embeddings().weight[:vocab_size]
        logits_of = lambda a, b: (h[a:b] @ w.t()).float()  # noqa: E731
        n = h.shape[0]
    else:
        full = model(**forward_inputs(ids, mask), use_cache=False).logits[..., :vocab_size][keep]
        logits_of = lambda a, b: full[a:b].float()  # noqa: E731
        n = full.shape[0]
    out_i, out_l = [], []
    for a in range(0, n, chunk):
        lp = torch.log_softmax(logits_of(a, a + chunk), dim=-1)
        top = lp.topk(k, dim=-1, sorted=True)
        out_i.append(top.indices)
        out_l.append(top.values)
    if not out_i:
        return torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k))
    return torch.cat(out_i), torch.cat(out_l)


@register_teacher
class LocalTeacher(Teacher):
    """A frozen causal LM run on each batch.

    Args:
        model: the teacher (moved to ``device``, eval mode, gradients off).
        vocab_size: shared vocabulary size (a padded output layer is sliced to it).
        name: shown in reports.
        tokenizer: the teacher's own tokenizer (when known).
    """

    name_of_kind = "local"
    kind = "local"
    offers = frozenset({"distribution", "any_sequence", "hidden_states", "weights", "text", "judge"})
    priority = 30
    packs = True  # its forward takes packed rows (per-sequence positions)
    what = "a local teacher model"

    def __init__(self, model: nn.Module, vocab_size: int, name: str = "teacher", device=None, tokenizer=None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.vocab_size = vocab_size
        self.name = name
        self.tokenizer = tokenizer
        self.can_fuse = supports_hidden(model) and not is_sharded(model)  # a sharded head exists only in its forward
        self.flops_per_token = 2 * linear_params(self.model)  # one forward (kdistill.throughput)

    @classmethod
    def accepts(cls, spec) -> bool:
        return spec.model is not None

    @classmethod
    def build(cls, spec, key: str, env) -> "LocalTeacher":
        if spec is env.primary:  # the run loaded it (to cut the student and measure the teacher)
            if env.weights is None:
                raise ConfigError(f"{key}.model: the teacher model is not loaded")
            model, tok = env.weights
            name = env.cfg.teacher.model if spec is env.cfg.teacher else spec.model
        else:
            model, tok = load_model(spec.model, f"{key}.model", spec.dtype, spec.revision, spec.trust_remote_code)
            name = spec.model
            if tokenizer_fingerprint(tok) != tokenizer_fingerprint(env.tokenizer):
                raise ModelError(
                    f"{key}.model: {spec.model} has a different tokenizer than the student; every teacher must share "
                    "the student's tokenizer for logit distillation"
                )
            shared = check_vocab(tok, env.tokenizer, model, env.student)
            if shared < env.vocab_size:
                raise ModelError(f"{key}.model: its vocabulary ({shared}) is smaller than the run's ({env.vocab_size})")
        t = cls(model, env.vocab_size, name=name, device=env.device, tokenizer=tok)
        t.key = key
        return t

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        """The teacher on ``batch``: final hidden states and output weight (``hidden`` and the head
        allows it) or logits; with ``feature_layers``, also those blocks' outputs (same forward)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        clock.add_flops(self.flops_per_token * int((mask != 0).sum()))
        if hidden and self.can_fuse:
            w = self.model.get_output_embeddings().weight[: self.vocab_size]
            if feature_layers:
                h, feats = decoder_states(self.model, ids, mask, feature_layers)
                return TeacherSignal(hidden=h, weight=w, features=feats)
            return TeacherSignal(hidden=final_hidden(self.model, ids, mask), weight=w)
        out = self.model(**forward_inputs(ids, mask), use_cache=False, output_hidden_states=bool(feature_layers))
        feats = block_outputs(out.hidden_states, feature_layers) if feature_layers else None
        return TeacherSignal(logits=out.logits[..., : self.vocab_size], features=feats)

    def topk_at_labels(self, batch: dict, k: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(indices [N, k], logprobs [N, k], None)`` at the labelled positions (row-major)."""
        i, lp = model_topk(self.model, batch, self.vocab_size, k)
        return i, lp, None

    def describe(self) -> dict:
        return {"name": self.name, "params": count_params(self.model), "kind": self.kind}
