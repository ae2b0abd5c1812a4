"""White-box logit distillation: the student matches the teacher's next-token distributions.

Loss per response token: ``alpha · T² · D(P_T ‖ Q_T) + (1 − alpha) · CE(Q, label)``. The fused,
chunked path (no ``[tokens x vocab]`` tensor) is used when both models expose their final hidden
states and output layer (``loss.fused: auto``), the plain path otherwise. With
``features.weight > 0`` a hidden-state term is added (:mod:`kdistill.features`), from the same
forward passes. A teacher with another tokenizer (``loss.cross_tokenizer``) gives a cross target
instead, compared span by span (:mod:`kdistill.losses.cross_tokenizer`).
"""

from __future__ import annotations

from kdistill.features import FeatureAdapters, feature_loss, hidden_size, layer_map
from kdistill.losses import distill_loss, fused_distill_loss
from kdistill.losses.cross_tokenizer import cross_tokenizer_loss
from kdistill.methods.base import Method, RunContext, register
from kdistill.teachers.multi import signal_parts
from kdistill.throughput import clock


@register
class LogitMethod(Method):
    name = "logit"
    uses_loss = True
    uses_features = True
    packs = True  # model and teacher forwards take packed rows; the losses are per token

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        return frozenset({"distribution"} | ({"hidden_states"} if cfg.features.weight > 0 else set()))

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        if ctx.teacher is None:
            raise ValueError("method logit needs a teacher")
        lc = ctx.cfg.loss
        self.kwargs = dict(
            divergence=lc.divergence,
            temperature=lc.temperature,
            beta=lc.beta,
            skew=lc.skew,
            hard_label_weight=1.0 - lc.alpha,
        )
        self.fused_setting = lc.fused
        self.cross = lc.cross_tokenizer  # uld | gold: for a teacher with another tokenizer
        self.chunk_size = lc.chunk_size
        self._init_features(ctx)
        # a served teacher answers over HTTP: ask for a batch's log-probs as soon as the batch is known
        self.prefetch = ctx.teacher.prefetch if ctx.teacher.prefetches else None
        self.looks_ahead = self.prefetch is not None

    def prepare_batch(self, batch: dict, model) -> dict:
        if self.prefetch is not None:  # this step's later micro-batches are asked for while earlier ones train
            self.prefetch(batch)
        return batch

    def lookahead(self, batches: list[dict]) -> None:
        for b in batches:
            self.prefetch(b)

    def _init_features(self, ctx: RunContext) -> None:
        fc = ctx.cfg.features
        self.feature_pairs = self.adapters = None
        if fc.weight <= 0:
            return
        if "hidden_states" not in ctx.teacher.offers:
            raise ValueError(ctx.teacher.refuse("hidden_states", self.name))
        if ctx.student is None:
            raise ValueError("features: the student is not known to the method")
        t_model = ctx.teacher.model
        self.feature_pairs = layer_map(fc.layers, ctx.student, t_model)
        self.s_layers = sorted({a for a, _ in self.feature_pairs})
        self.t_layers = sorted({b for _, b in self.feature_pairs})
        adapters = FeatureAdapters(self.feature_pairs, hidden_size(ctx.student), hidden_size(t_model),
                                   seed=ctx.cfg.train.seed)
        self.adapters = adapters.to(next(ctx.student.parameters()).device) if len(adapters.maps) else None
        self.feature_history: list[float] = []

    def trainable_modules(self):
        return self.adapters

    def use_fused(self, model) -> bool:
        student = getattr(model, "module", model)  # unwrap DDP
        can = getattr(student, "can_fuse", False) and getattr(self.ctx.teacher, "can_fuse", True)
        if self.fused_setting is True and not can:
            raise ValueError("loss.fused: true, but a model's logits are not hidden @ W.T (set loss.fused: auto)")
        return bool(can) if self.fused_setting == "auto" else bool(self.fused_setting)

    def loss_kwargs(self, batch: dict) -> dict:
        """The divergence settings for this batch (subclasses may change them per batch)."""
        return self.kwargs

    def loss(self, model, batch, num_items):
        V = self.ctx.vocab_size
        kw = self.loss_kwargs(batch)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        feats = self.feature_pairs is not None
        s_layers = {"feature_layers": self.s_layers} if feats else {}
        t_layers = {"feature_layers": self.t_layers} if feats else {}
        loss = 0.0
        if self.use_fused(model):
            s_hidden, s_weight, *s_feats = model(ids, mask, hidden=True, **s_layers)
            with clock.section("teacher"):
                signal = self.ctx.teacher.signal(batch, hidden=True, **t_layers)
            for w, t in signal_parts(signal):  # one part, or several teachers with loss.teacher_mix: sum
                if t.cross is not None:  # a teacher with another tokenizer (loss.cross_tokenizer)
                    part = cross_tokenizer_loss(self.cross, labels, t.cross, hidden=s_hidden, weight=s_weight[:V],
                                                chunk_size=self.chunk_size, num_items=num_items, **kw)
                elif t.topk is not None:
                    part = fused_distill_loss(
                        s_hidden, s_weight[:V], None, None, labels, teacher_topk=t.topk,
                        chunk_size=self.chunk_size, num_items=num_items, **kw,
                    )
                elif t.hidden is not None:
                    part = fused_distill_loss(
                        s_hidden, s_weight[:V], t.hidden, t.weight, labels,
                        chunk_size=self.chunk_size, num_items=num_items, **kw,
                    )
                else:  # teacher gave logits: project the student densely, plain loss
                    logits = s_hidden @ s_weight[:V].t()
                    part = distill_loss(logits, t.logits, labels, num_items=num_items, **kw)
                loss = loss + w * part
        else:
            out = model(ids, mask, **s_layers)
            logits, s_feats = (out[0], out[1:]) if feats else (out, [])
            logits = logits[..., :V]
            with clock.section("teacher"):
                signal = self.ctx.teacher.signal(batch, hidden=False, **t_layers)
            for w, t in signal_parts(signal):
                if t.cross is not None:
                    loss = loss + w * cross_tokenizer_loss(self.cross, labels, t.cross, logits=logits,
                                                           num_items=num_items, **kw)
                    continue
                loss = loss + w * distill_loss(logits, t.logits, labels, num_items=num_items, teacher_topk=t.topk,
                                               **kw)
        if not feats:
            return loss, {}
        fc = self.ctx.cfg.features
        f = feature_loss(s_feats[0], signal.features, self.feature_pairs, labels, num_items, self.adapters,
                         fc.loss, fc.normalize)
        value = float(f.detach())
        self.feature_history.append(value * float(num_items) / max(1, int((labels != -100).sum())))
        return loss + fc.weight * f, {"feature_loss": value}

    def summary(self) -> dict:
        out = {}
        served = self.ctx.teacher.summary()  # a served teacher's requests, retries, batches asked for early
        if served:
            out["served_teacher"] = served
        cross = [t.cross_summary() for t in (getattr(self.ctx.teacher, "teachers", None) or [self.ctx.teacher])
                 if hasattr(t, "cross_summary")]
        if cross:
            out["cross_tokenizer"] = {"loss": self.cross, **cross[0]} if len(cross) == 1 else {
                "loss": self.cross, "teachers": cross}
        if self.feature_pairs is None:
            return out
        h = self.feature_history
        k = max(1, len(h) // 5)
        fc = self.ctx.cfg.features
        return {**out, "features": {
            "pairs": [list(p) for p in self.feature_pairs], "loss": fc.loss, "weight": fc.weight,
            "adapter_params": sum(p.numel() for p in self.adapters.parameters()) if self.adapters is not None else 0,
            "feature_loss_first": round(sum(h[:k]) / k, 6) if h else None,
            "feature_loss_last": round(sum(h[-k:]) / k, 6) if h else None,
        }}
