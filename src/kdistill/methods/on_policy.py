"""On-policy distillation: generalized KD (GKD, Agarwal et al. 2024).

Per micro-batch, with probability ``on_policy.lambda`` the completions are *sampled from the
student* for the batch's prompts (batched generation with a KV cache, temperature
``on_policy.temperature``); otherwise the batch keeps the dataset's responses, or, with
``on_policy.seq_kd: true``, the teacher's own samples. The teacher is run on whatever sequences
the batch ends up with, and the student is trained to match its next-token distributions with
``loss.divergence`` (default here: ``jsd``, β = ``loss.beta`` = 0.5) at ``loss.temperature`` —
exactly the ``logit`` method's loss, on other sequences.

A sampled batch is rebuilt row by row as ``prompt ids + completion ids``: the prompt is masked
(-100), every completion token is trained, the completion ends at the first EOS (which is trained:
the student learns when to stop) and whatever the generator produced after it is dropped. The
hard-label (cross-entropy) term, if ``loss.alpha < 1``, is not applied to student samples (it would
reinforce the student's own guesses); it stays on dataset and teacher-sampled batches.

Each draw is its own seeded generator, keyed by ``train.seed`` and the micro-batch's global index
(``batch["micro_batch"]``, set by the trainer): the schedule of student-sampled batches does not
depend on the engine (a vLLM engine re-seeds the process; transformers' sampling draws from the
global generator), on the number of processes, or on a resume. With ``lambda: 0`` (and ``seq_kd:
false``) no draw is made and the method is ``logit`` batch for batch.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field

from kdistill.batching import attention_cost, pack_rows
from kdistill.data import collate, completion_feature
from kdistill.methods.base import RunContext, register
from kdistill.methods.logit import LogitMethod
from kdistill.models import eos_ids, hf_model
from kdistill.sampling import make_sampler, sample_completions
from kdistill.section import ALIASED
from kdistill.settings import ENGINE_DESCRIPTION, Section
from kdistill.vllm_engine import import_vllm


class OnPolicyConfig(Section):
    """``method: on_policy`` — generalized KD (GKD, Agarwal et al. 2024).

    Per batch, with probability ``lambda`` the completions are sampled from the student; otherwise
    they are the dataset's responses (or the teacher's own samples with ``seq_kd: true``). The
    teacher's logits on those sequences are the target of ``loss.divergence`` (for this method
    ``loss.divergence`` defaults to ``jsd`` and ``loss.alpha`` to 1.0 unless set).
    """

    model_config = ALIASED

    lambda_: float = Field(0.5, ge=0.0, le=1.0, alias="lambda",
                           description="probability that a batch is sampled from the student (0 = method: logit)")
    seq_kd: bool = Field(False, description="off-policy batches use the teacher's samples instead of the dataset's responses")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (0 = greedy); the loss uses loss.temperature")
    max_new_tokens: int = Field(64, ge=1, description="longest sampled completion")
    engine: Literal["transformers", "vllm"] = Field("transformers", description=ENGINE_DESCRIPTION)


@register
class OnPolicyMethod(LogitMethod):
    name = "on_policy"
    sections = {"on_policy": OnPolicyConfig}
    loss_defaults = {"divergence": "jsd", "alpha": 1.0}  # GKD's defaults, unless set in loss:

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        # the teacher scores the student's new sequences (a cache cannot); seq_kd samples from its weights
        return super().teacher_needs(cfg) | {"any_sequence"} | ({"weights"} if cfg.on_policy.seq_kd else set())

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.looks_ahead = False  # which sequences a step trains on is decided when it is prepared
        oc = ctx.cfg.on_policy
        self.lam = float(oc.lambda_)
        self.seed = ctx.cfg.train.seed
        self.seq_kd = bool(oc.seq_kd)
        self.temperature = float(oc.temperature)
        self.max_new_tokens = int(oc.max_new_tokens)
        self.max_length = ctx.cfg.data.max_length
        self.engine = oc.engine
        if self.engine == "vllm" and self.lam > 0:
            import_vllm("on_policy.engine")  # fail before any training when it is missing
        self.sampler = None  # built on the first student batch (it needs the model)
        if self.lam > 0 and "any_sequence" not in ctx.teacher.offers:
            raise ValueError("on_policy needs a live teacher (teacher.model, or a vLLM server with teacher.api.logprobs): "
                             "the teacher must score the student's new sequences, which a cache cannot")
        if self.seq_kd and ctx.teacher.model is None:
            raise ValueError("on_policy.seq_kd: sampling sequences from the teacher needs teacher.model")
        if ctx.renderer is None:
            raise ValueError("on_policy needs the run's renderer (prompt ids)")
        self.prompts = {e.id: ctx.renderer.prompt_ids(e) for e in ctx.train_examples}
        self.counts = {"batches": 0, "student": 0, "teacher": 0, "dataset": 0}
        self.sampled = {"completions": 0, "tokens": 0, "ended_with_eos": 0}

    # -- batches ------------------------------------------------------------------------------

    def _draw(self, batch: dict) -> bool:
        """Whether this micro-batch is sampled from the student (see the module doc)."""
        if self.lam <= 0.0:
            return False
        if self.lam >= 1.0:
            return True
        index = batch.get("micro_batch", self.counts["batches"])  # outside the trainer: this method's own count
        return random.Random(f"{self.seed}:on_policy:{index}").random() < self.lam

    def sampled_batch(self, batch: dict, generator, source: str) -> dict:
        """The batch's prompts with completions sampled from ``generator`` (a causal LM): the
        student through ``on_policy.engine``, the teacher (``seq_kd``) with transformers."""
        row_ids = batch["ids"]
        missing = [i for i in row_ids if i not in self.prompts]
        if missing:
            raise KeyError(f"on_policy: batch rows {missing[:3]} are not training rows (no prompt known)")
        prompts = [self.prompts[i] for i in row_ids]
        tok = self.ctx.tokenizer
        room = max(1, min(self.max_new_tokens, self.max_length - max(len(p) for p in prompts)))
        if source == "student":
            if self.sampler is None:
                self.sampler = make_sampler(self.engine, "on_policy.engine", self.ctx, generator, len(prompts))
            comps = self.sampler(generator, prompts, room, self.temperature)
        else:
            comps = sample_completions(generator, tok, prompts, room, self.temperature, batch_size=len(prompts))
        eos = set(eos_ids(hf_model(generator), tok))
        feats = [completion_feature(p, c, i, self.max_length) for p, c, i in zip(prompts, comps, row_ids)]
        self.sampled["completions"] += len(comps)
        self.sampled["tokens"] += sum(len(c) for c in comps)
        self.sampled["ended_with_eos"] += sum(bool(c) and c[-1] in eos for c in comps)
        if self.ctx.cfg.train.batching == "packed":  # sampled rows end at different lengths: pack them too
            new = pack_rows(feats, tok.pad_token_id, attention_cost(hf_model(generator)))
        else:
            new = collate(feats, tok.pad_token_id)
        device = batch["input_ids"].device
        out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in new.items()}
        out["source"] = source
        return out

    def prepare_batch(self, batch: dict, model) -> dict:
        student = self._draw(batch)
        self.counts["batches"] += 1
        if student:
            self.counts["student"] += 1
            batch = self.sampled_batch(batch, model, "student")
        elif self.seq_kd:
            self.counts["teacher"] += 1
            batch = self.sampled_batch(batch, self.ctx.teacher.model, "teacher")
        else:
            self.counts["dataset"] += 1
        if self.prefetch is not None:  # a served teacher scores this batch while the next one is sampled
            self.prefetch(batch)
        return batch

    # -- loss ---------------------------------------------------------------------------------

    def loss_kwargs(self, batch: dict) -> dict:
        if batch.get("source") == "student":  # no cross-entropy on the student's own guesses
            return {**self.kwargs, "hard_label_weight": 0.0}
        return self.kwargs

    def loss(self, model, batch, num_items):
        on_policy = batch.get("source") == "student"
        loss, info = super().loss(model, batch, num_items)
        if self.sampler is not None:
            # an optimizer step follows this step's losses, and every batch of the step was prepared
            # before its first loss: the next generation must see the new weights
            self.sampler.mark_stale()
        if self.lam > 0:
            info = {**info, "on_policy": 1.0 if on_policy else 0.0}
        return loss, info

    def summary(self) -> dict:
        c, s = self.counts, self.sampled
        n = max(1, c["batches"])
        return {
            **super().summary(),
            "lambda": self.lam,
            "seq_kd": self.seq_kd,
            "sampling_temperature": self.temperature,
            "batches": c["batches"],
            "on_policy_batches": c["student"],
            "on_policy_fraction": round(c["student"] / n, 4),
            "teacher_sampled_batches": c["teacher"],
            "dataset_batches": c["dataset"],
            "sampled_completions": s["completions"],
            "mean_completion_tokens": round(s["tokens"] / s["completions"], 2) if s["completions"] else None,
            "completions_ending_with_eos": round(s["ended_with_eos"] / s["completions"], 4) if s["completions"] else None,
            "engine": self.engine,
            **({"engine_" + k: v for k, v in self.sampler.stats.items()} if self.sampler is not None else {}),
            "note": "counts cover the micro-batches of this process since the run (or its resume) started",
        }
