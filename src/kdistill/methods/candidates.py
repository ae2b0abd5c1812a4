"""Sample candidates, score them, keep the best, fine-tune: ``on_policy_filter`` and ``self_distill``.

These methods run in stages (one per round: ``on_policy_filter.rounds``, ``self_distill.iterations``).
Each round ``r`` lives in ``output_dir/<method>/round-r/``:

* ``candidates.jsonl`` — per training prompt, ``n`` completions sampled from the current student,
  each with its token ids, text, whether it ended with EOS, and its score. Written append-only per
  batch of prompts: an interrupted round continues with the prompts not yet done.
* ``kept.jsonl`` — the selected candidates (the fine-tuning data of the round).
* ``scores.json`` — the round's figures; ``checkpoints/``, ``metrics.jsonl`` — its trainer pass
  (cross-entropy on the kept completions, prompt masked, ``train.max_steps`` steps), which resumes
  from its last checkpoint; ``student/`` and ``done.json`` once the round is finished (a finished
  round is skipped on rerun, and the next one starts from its ``student/``).

Kept completions are trained on exactly as sampled (token ids, EOS included when the student
produced one), so no text round trip changes them.

``on_policy_filter``: the teacher scores (its mean log-likelihood of the candidate, or as a judge),
and the best ``keep`` candidates *per prompt* are kept (optionally only those >= ``min_score``).
``self_distill``: the scorer is the model itself (its own mean log-likelihood), the teacher as a
judge, or the teacher's log-likelihood; the best ``keep_fraction`` of *all* candidates is kept.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from kdistill.data import Renderer, completion_feature
from kdistill.methods.base import Method, RunContext, register
from kdistill.models import eos_ids, hf_model, load_saved, save_model
from kdistill.sampling import make_sampler
from kdistill.scoring import DEFAULT_JUDGE_TEMPLATE, judge_scores, loglik_scores
from kdistill.settings import ENGINE_DESCRIPTION, Section
from kdistill.stages import combine_metrics, process_seed
from kdistill.store import JsonlStore, run_stage, write_json, write_jsonl
from kdistill.vllm_engine import import_vllm

class RatingConfig(Section):
    """How a model rates an answer as a judge (``scorer: judge``): a rating prompt, scored from the
    judge's next-token probabilities of the tokens "1".."scale" (expected rating, in [1, scale])."""

    template: Optional[str] = Field(None, description="judge prompt with {prompt}, {answer}, {scale}; none = built-in")
    scale: int = Field(5, ge=2, le=9, description="ratings 1..scale (each must be one token)")
    max_length: int = Field(1024, ge=16, description="judge prompts are cut to their last max_length tokens")


class OnPolicyFilterConfig(Section):
    """``method: on_policy_filter`` — the student writes ``n`` candidates per prompt, the teacher scores
    them, the best ``keep`` per prompt are kept and the student is fine-tuned on them (cross-entropy,
    ``train.max_steps`` per round); repeated for ``rounds``."""

    rounds: int = Field(2, ge=1)
    n: int = Field(4, ge=1, description="candidates per prompt")
    keep: int = Field(1, ge=1, description="best candidates kept per prompt")
    min_score: Optional[float] = Field(None, description="also drop kept candidates scoring below this")
    scorer: Literal["loglik", "judge"] = Field(
        "loglik", description="loglik: the teacher's mean log-likelihood of the candidate; judge: the teacher rates it (see rating)"
    )
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (0 = greedy)")
    max_new_tokens: int = Field(64, ge=1)
    prompts_per_round: Optional[int] = Field(None, ge=1, description="training prompts per round (a seeded sample); none = all")
    engine: Literal["transformers", "vllm"] = Field("transformers", description=ENGINE_DESCRIPTION)


class SelfDistillConfig(Section):
    """``method: self_distill`` — the model writes ``n`` candidates per prompt, they are scored, the top
    ``keep_fraction`` of all candidates is kept and the model is fine-tuned on them, for ``iterations``."""

    iterations: int = Field(2, ge=1)
    n: int = Field(4, ge=1, description="candidates per prompt")
    keep_fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of all candidates kept (best first)")
    scorer: Literal["self", "judge", "teacher_loglik"] = Field(
        "self", description="self: the model's own mean log-likelihood; judge: the teacher rates it; teacher_loglik"
    )
    temperature: float = Field(1.0, ge=0.0)
    max_new_tokens: int = Field(64, ge=1)
    prompts_per_round: Optional[int] = Field(None, ge=1)
    engine: Literal["transformers", "vllm"] = Field("transformers", description=ENGINE_DESCRIPTION)


def judge_renderer(ctx: RunContext) -> Renderer:
    return Renderer(ctx.tokenizer, ctx.cfg.rating.max_length, None, ctx.cfg.data.chat_template)


def score_candidates(kind: str, ctx: RunContext, model, prompts: list[str], feats: list[dict], texts: list[str]) -> list[float]:
    """Scores (higher = better) of candidates given as training rows ``feats`` and texts ``texts``.

    ``loglik``/``teacher_loglik``/``self``: ``model``'s mean log-likelihood per completion token;
    ``judge``: ``model``'s expected rating (see :func:`kdistill.scoring.judge_scores`).
    """
    bs = ctx.cfg.eval.batch_size
    if kind == "judge":
        rc = ctx.cfg.rating
        template = rc.template or DEFAULT_JUDGE_TEMPLATE
        if model is None and api_teacher(ctx) is not None:  # a text-only teacher: its integer ratings
            ratings = api_teacher(ctx).rate([template.format(prompt=p, answer=a, scale=rc.scale)
                                             for p, a in zip(prompts, texts)], rc.scale)
            return [r if r is not None else 0.0 for r in ratings]  # unrated: below every rating
        return judge_scores(model, ctx.tokenizer, judge_renderer(ctx), prompts, texts, template, rc.scale, bs)
    if model is None and ctx.teacher is not None and "any_sequence" in ctx.teacher.offers:
        # a vLLM server: the same mean, from its log-probs
        return ctx.teacher.mean_loglik(feats, ctx.tokenizer.pad_token_id, bs)
    if model is None:
        raise ValueError(f"scorer {kind}: needs the teacher's token probabilities (teacher.model, or a vLLM server "
                         "with teacher.api.logprobs); a text-only API teacher can only judge (scorer: judge)")
    return loglik_scores(model, feats, ctx.tokenizer.pad_token_id, ctx.vocab_size, bs)


def api_teacher(ctx: RunContext):
    """The teacher as text over HTTP (answers, ratings): a text-only API teacher, or a served one's chat side."""
    return ctx.teacher.text if ctx.teacher is not None else None


def teacher_model(ctx: RunContext) -> Optional[torch.nn.Module]:
    return ctx.teacher.model if ctx.teacher is not None else None


def _mean(xs):
    return round(sum(xs) / len(xs), 6) if xs else None


#: what the teacher must give for each scorer
SCORER_NEEDS = {"self": frozenset(), "judge": frozenset({"judge"}), "loglik": frozenset({"any_sequence"})}


class CandidatesMethod(Method):
    """Shared loop; subclasses set the config section, the scorer and :meth:`select`."""

    name = "candidates"
    needs_responses = False  # the student writes the answers
    single_pass = False

    @classmethod
    def scorer_of(cls, cfg) -> str:
        return getattr(cfg, cls.name).scorer

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        return SCORER_NEEDS[cls.scorer_of(cfg)]

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.sc = getattr(ctx.cfg, self.name)
        self.rounds: list[dict] = []
        self.sampler = None  # the student's sampler (``engine``), built on first use
        if self.sc.engine == "vllm":
            import_vllm(f"{self.name}.engine")  # fail before any work when it is missing

    # -- subclass hooks -------------------------------------------------------------------------
    def n_rounds(self) -> int:
        raise NotImplementedError

    def scorer_kind(self) -> str:
        return self.scorer_of(self.ctx.cfg)

    def select(self, rows: list[dict]) -> list[tuple[dict, int]]:
        """(prompt row, candidate index) pairs to keep."""
        raise NotImplementedError

    # -- the loop -----------------------------------------------------------------------------
    def _prompts(self, r: int) -> list:
        items = list(self.ctx.train_examples)
        k = self.sc.prompts_per_round
        if k is not None and k < len(items):
            items = random.Random(self.ctx.cfg.train.seed * 1000 + r).sample(items, k)
        return items

    def _candidates(self, student, r: int, rdir: Path, progress: bool = False) -> list[dict]:
        ctx, sc = self.ctx, self.sc
        tok, renderer, max_len = ctx.tokenizer, ctx.renderer, ctx.cfg.data.max_length
        kind = self.scorer_kind()
        scorer = student if kind == "self" else teacher_model(ctx)
        eos = set(eos_ids(hf_model(student), tok))
        torch.manual_seed(process_seed(ctx.cfg.train.seed * 1000 + r))  # each process samples its own stream
        store = JsonlStore(rdir / "candidates.jsonl")
        if self.sampler is None:
            self.sampler = make_sampler(sc.engine, f"{self.name}.engine", ctx, student, ctx.cfg.eval.batch_size)
        self.sampler.mark_stale()  # the student was fine-tuned (or reloaded) since the last round

        def make(examples) -> list[dict]:
            prompt_ids = [renderer.prompt_ids(e) for e in examples]
            room = max(1, min(sc.max_new_tokens, max_len - max(len(p) for p in prompt_ids)))
            comps = self.sampler(student, prompt_ids, room, sc.temperature, num_samples=sc.n)
            feats, texts, prompts = [], [], []
            for i, c in enumerate(comps):
                j = i // sc.n
                feats.append(completion_feature(prompt_ids[j], c, examples[j].id, max_len))
                texts.append(tok.decode(c, skip_special_tokens=True).strip())
                prompts.append(examples[j].prompt)
            scores = score_candidates(kind, ctx, scorer, prompts, feats, texts)
            rows = []
            for j, e in enumerate(examples):
                cands = []
                for k in range(sc.n):
                    i = j * sc.n + k
                    cands.append({"text": texts[i], "completion_ids": comps[i], "eos": bool(comps[i]) and comps[i][-1] in eos,
                                  "score": round(float(scores[i]), 6)})
                rows.append({"id": e.id, "prompt": e.prompt, "prompt_ids": prompt_ids[j], "candidates": cands})
            return rows

        return store.fill(self._prompts(r), lambda e: e.id, make, ctx.cfg.eval.batch_size,
                          desc=f"round {r} candidates" if progress else None)

    def _round(self, student, r: int, rdir: Path, stages) -> tuple:
        """One round: candidates, the kept ones, a fine-tuning pass; ``(student, summary)``."""
        stages.say(f"{self.name} round {r}/{self.n_rounds()}: sampling {self.sc.n} candidates per prompt")
        rows = self._candidates(student, r, rdir, stages.progress)
        kept = self.select(rows)
        kept_rows = [{"id": f"{row['id']}#{k}", "prompt_id": row["id"], "prompt": row["prompt"],
                      "response": row["candidates"][k]["text"], "score": row["candidates"][k]["score"],
                      "prompt_ids": row["prompt_ids"], "completion_ids": row["candidates"][k]["completion_ids"]}
                     for row, k in kept]
        write_jsonl(rdir / "kept.jsonl", kept_rows)
        all_scores = [c["score"] for row in rows for c in row["candidates"]]
        kept_scores = [k["score"] for k in kept_rows]
        if not kept_rows:
            raise ValueError(f"{self.name} round {r}: no candidate was kept (check min_score / keep settings)")
        feats = [completion_feature(k["prompt_ids"], k["completion_ids"], k["id"], self.ctx.cfg.data.max_length)
                 for k in kept_rows]
        stages.say(f"{self.name} round {r}: kept {len(kept_rows)} of {len(all_scores)} candidates; fine-tuning")
        student, result = stages.train(student, Method(self.ctx), feats, rdir)
        save_model(student, rdir / "student")
        summary = {
            "round": r, "prompts": len(rows), "candidates": len(all_scores), "kept": len(kept_rows),
            "mean_score": _mean(all_scores), "mean_kept_score": _mean(kept_scores),
            "min_kept_score": min(kept_scores), "max_score": max(all_scores),
            "ended_with_eos": _mean([float(c["eos"]) for row in rows for c in row["candidates"]]),
            "steps": result.steps, "resumed_from": result.resumed_from, "heldout": stages.evaluate(student),
        }
        write_json(rdir / "scores.json", {**summary, "scores": [[c["score"] for c in row["candidates"]] for row in rows]})
        return student, summary

    def fit(self, student, stages):
        out = Path(self.ctx.output_dir) / self.name
        t0 = time.time()
        resumed = None
        for r in range(1, self.n_rounds() + 1):
            rdir = out / f"round-{r}"
            was = student
            student, summary = run_stage(rdir, lambda: self._round(was, r, rdir, stages),
                                         lambda done: load_saved(was, rdir / "student"))
            self.rounds.append(summary)
            if resumed is None and summary.get("finished_earlier"):
                resumed = f"round {r} (finished earlier)"
            elif resumed is None and summary.get("resumed_from") is not None:
                resumed = f"round {r} step {summary['resumed_from']}"
        combine_metrics(self.ctx.output_dir, [(f"round-{r}", out / f"round-{r}") for r in range(1, self.n_rounds() + 1)])
        return student, {"steps": sum(s["steps"] for s in self.rounds), "seconds": round(time.time() - t0, 1),
                         "train_rows": sum(s["kept"] for s in self.rounds), "resumed_from": resumed,
                         "stopped_early": False, "rounds": self.n_rounds()}

    def summary(self) -> dict:
        t = self.ctx.teacher
        served = t.summary() if t is not None else {}
        api = getattr(t, "text_if_used", None) if served else api_teacher(self.ctx)
        return {
            **({"served_teacher": served} if served else {}),
            **({"api_judge": dict(api.stats)} if api is not None else {}),
            "scorer": self.sc.scorer,
            "candidates_per_prompt": self.sc.n,
            "candidates_kept_per_round": [r["kept"] for r in self.rounds],
            "mean_score_per_round": [r["mean_score"] for r in self.rounds],
            "mean_kept_score_per_round": [r["mean_kept_score"] for r in self.rounds],
            "rounds": self.rounds,
            "engine": self.sc.engine,
            **({"engine_" + k: v for k, v in self.sampler.stats.items()} if self.sampler is not None else {}),
            "data": f"{self.name}/round-N/{{candidates,kept}}.jsonl, scores.json",
        }


@register
class OnPolicyFilter(CandidatesMethod):
    name = "on_policy_filter"
    sections = {"on_policy_filter": OnPolicyFilterConfig, "rating": RatingConfig}

    def n_rounds(self) -> int:
        return self.sc.rounds

    def select(self, rows):
        kept = []
        for row in rows:
            order = sorted(range(len(row["candidates"])), key=lambda k: -row["candidates"][k]["score"])
            for k in order[: self.sc.keep]:
                if self.sc.min_score is None or row["candidates"][k]["score"] >= self.sc.min_score:
                    kept.append((row, k))
        return kept


@register
class SelfDistill(CandidatesMethod):
    name = "self_distill"
    sections = {"self_distill": SelfDistillConfig, "rating": RatingConfig}

    @classmethod
    def scorer_of(cls, cfg) -> str:
        s = cfg.self_distill.scorer
        return "loglik" if s == "teacher_loglik" else s

    def n_rounds(self) -> int:
        return self.sc.iterations

    def select(self, rows):
        flat = [(row, k) for row in rows for k in range(len(row["candidates"]))]
        flat.sort(key=lambda rk: -rk[0]["candidates"][rk[1]]["score"])
        n = max(1, math.ceil(self.sc.keep_fraction * len(flat)))
        return flat[:n]

