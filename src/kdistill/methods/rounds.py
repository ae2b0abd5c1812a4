"""Rounds of *generate -> score -> keep the best -> fine-tune*: ``on_policy_filter`` and ``self_distill``.

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

import torch

from kdistill.data import Renderer
from kdistill.feedback import (
    DEFAULT_JUDGE_TEMPLATE,
    JsonlStore,
    completion_feature,
    hf_model,
    judge_scores,
    load_saved,
    loglik_scores,
    mark_done,
    save_model,
    stage_done,
    write_json,
    write_jsonl,
)
from kdistill.generation import eos_ids, make_sampler
from kdistill.methods import register
from kdistill.methods.base import Method, RunContext
from kdistill.stages import combine_metrics, process_seed


def judge_renderer(ctx: RunContext) -> Renderer:
    return Renderer(ctx.tokenizer, ctx.cfg.rating.max_length, None, ctx.cfg.data.chat_template)


def teacher_model(ctx: RunContext, why: str):
    model = getattr(ctx.teacher, "model", None)
    if model is None:
        raise ValueError(f"{why} needs a live teacher model (teacher.model), not a cache or an API")
    return model


def score_candidates(kind: str, ctx: RunContext, model, prompts: list[str], feats: list[dict], texts: list[str]) -> list[float]:
    """Scores (higher = better) of candidates given as training rows ``feats`` and texts ``texts``.

    ``loglik``/``teacher_loglik``/``self``: ``model``'s mean log-likelihood per completion token;
    ``judge``: ``model``'s expected rating (see :func:`kdistill.feedback.judge_scores`).
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
    if model is None and served_teacher(ctx) is not None:  # a vLLM server: the same mean, from its log-probs
        return served_teacher(ctx).mean_loglik(feats, ctx.tokenizer.pad_token_id, bs)
    if model is None:
        raise ValueError(f"scorer {kind}: needs the teacher's token probabilities (teacher.model, or a vLLM server "
                         "with teacher.api.logprobs); a text-only API teacher can only judge (scorer: judge)")
    return loglik_scores(model, feats, ctx.tokenizer.pad_token_id, ctx.vocab_size, bs)


def served_teacher(ctx: RunContext):
    """The run's teacher when it is a vLLM server giving log-probs (teacher.api.logprobs), or None."""
    from kdistill.teachers.api_logprobs import ApiLogprobTeacher

    return ctx.teacher if isinstance(ctx.teacher, ApiLogprobTeacher) else None


def api_teacher(ctx: RunContext):
    """The teacher as text over HTTP (answers, ratings): a text-only API teacher, or a served one's chat side."""
    from kdistill.teachers.api import ApiTextTeacher

    if served_teacher(ctx) is not None:
        return served_teacher(ctx).text
    return ctx.teacher if isinstance(ctx.teacher, ApiTextTeacher) else None


def _mean(xs):
    return round(sum(xs) / len(xs), 6) if xs else None


class RoundsMethod(Method):
    """Shared loop; subclasses set the config section, the scorer and :meth:`select`."""

    name = "rounds"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.sc = getattr(ctx.cfg, self.name)
        self.rounds: list[dict] = []
        self.sampler = None  # the student's sampler (``engine``), built on first use
        if self.sc.engine == "vllm":
            from kdistill.vllm_engine import import_vllm

            import_vllm(f"{self.name}.engine")  # fail before any work when it is missing
        kind = self.scorer_kind()
        over_http = (kind == "judge" and api_teacher(ctx) is not None) or served_teacher(ctx) is not None
        if kind != "self" and not over_http:
            teacher_model(ctx, f"{self.name} with scorer {kind}")

    # -- subclass hooks -------------------------------------------------------------------------
    def n_rounds(self) -> int:
        raise NotImplementedError

    def scorer_kind(self) -> str:
        return self.sc.scorer

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
        scorer = student if kind == "self" else getattr(ctx.teacher, "model", None)
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

    def fit(self, student, runner):
        out = Path(self.ctx.output_dir) / self.name
        t0 = time.time()
        steps = 0
        resumed = None
        n_kept_total = 0
        for r in range(1, self.n_rounds() + 1):
            rdir = out / f"round-{r}"
            done = stage_done(rdir)
            if done is not None:
                student = load_saved(student, rdir / "student")
                self.rounds.append(done)
                steps += done["steps"]
                n_kept_total += done["kept"]
                resumed = resumed or f"round {r} (finished earlier)"
                continue
            runner.say(f"{self.name} round {r}/{self.n_rounds()}: sampling {self.sc.n} candidates per prompt")
            rows = self._candidates(student, r, rdir, runner.progress)
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
            runner.say(f"{self.name} round {r}: kept {len(kept_rows)} of {len(all_scores)} candidates; fine-tuning")
            student, result = runner.train(student, Method(self.ctx), feats, rdir)
            save_model(student, rdir / "student")
            if result.resumed_from is not None and resumed is None:
                resumed = f"round {r} step {result.resumed_from}"
            summary = {
                "round": r, "prompts": len(rows), "candidates": len(all_scores), "kept": len(kept_rows),
                "mean_score": _mean(all_scores), "mean_kept_score": _mean(kept_scores),
                "min_kept_score": min(kept_scores), "max_score": max(all_scores),
                "ended_with_eos": _mean([float(c["eos"]) for row in rows for c in row["candidates"]]),
                "steps": result.steps, "resumed_from": result.resumed_from, "heldout": runner.evaluate(student),
            }
            write_json(rdir / "scores.json",
                       {**summary, "scores": [[c["score"] for c in row["candidates"]] for row in rows]})
            mark_done(rdir, summary)
            self.rounds.append(summary)
            steps += result.steps
            n_kept_total += len(kept_rows)
        combine_metrics(self.ctx.output_dir, [(f"round-{r}", out / f"round-{r}") for r in range(1, self.n_rounds() + 1)])
        return student, {"steps": steps, "seconds": round(time.time() - t0, 1), "train_rows": n_kept_total,
                         "resumed_from": resumed, "stopped_early": False, "rounds": self.n_rounds()}

    def summary(self) -> dict:
        served = served_teacher(self.ctx)
        api = served.text_if_used if served is not None else api_teacher(self.ctx)
        return {
            **({"served_teacher": served.summary()} if served is not None else {}),
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


class OnPolicyFilter(RoundsMethod):
    name = "on_policy_filter"

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


class SelfDistill(RoundsMethod):
    name = "self_distill"

    def n_rounds(self) -> int:
        return self.sc.iterations

    def scorer_kind(self) -> str:
        return "loglik" if self.sc.scorer == "teacher_loglik" else self.sc.scorer

    def select(self, rows):
        flat = [(row, k) for row in rows for k in range(len(row["candidates"]))]
        flat.sort(key=lambda rk: -rk[0]["candidates"][rk[1]]["score"])
        n = max(1, math.ceil(self.sc.keep_fraction * len(flat)))
        return flat[:n]


@register("on_policy_filter", needs_responses=False)
def _build_filter(ctx: RunContext) -> OnPolicyFilter:
    return OnPolicyFilter(ctx)


@register("self_distill", needs_responses=False)
def _build_self(ctx: RunContext) -> SelfDistill:
    return SelfDistill(ctx)
