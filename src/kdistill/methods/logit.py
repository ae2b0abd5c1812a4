"""White-box logit distillation: the student matches the teacher's next-token distributions.

Loss per response token: ``alpha · T² · D(P_T ‖ Q_T) + (1 − alpha) · CE(Q, label)``. The fused,
chunked path (no ``[tokens x vocab]`` tensor) is used when both models expose their final hidden
states and output layer (``loss.fused: auto``), the plain path otherwise.
"""

from __future__ import annotations


from kdistill.losses import distill_loss, fused_distill_loss
from kdistill.methods import register
from kdistill.methods.base import Method, RunContext
from kdistill.teachers.multi import signal_parts


class LogitMethod(Method):
    name = "logit"

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
        self.chunk_size = lc.chunk_size

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
        loss = 0.0
        if self.use_fused(model):
            s_hidden, s_weight = model(ids, mask, hidden=True)
            signal = self.ctx.teacher.signal(batch, hidden=True)
            for w, t in signal_parts(signal):  # one part, or several teachers with loss.teacher_mix: sum
                if t.topk is not None:
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
            logits = model(ids, mask)[..., :V]
            signal = self.ctx.teacher.signal(batch, hidden=False)
            for w, t in signal_parts(signal):
                loss = loss + w * distill_loss(logits, t.logits, labels, num_items=num_items, teacher_topk=t.topk,
                                               **kw)
        return loss, {}


@register("logit")
def _build(ctx: RunContext) -> Method:
    return LogitMethod(ctx)
