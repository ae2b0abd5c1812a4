"""``method: zephyr`` — distilled SFT, AI feedback, distilled DPO (Tunstall et al. 2023).

Stages, each in its own folder under ``output_dir/zephyr/`` and each resumable:

1. ``1-sft/`` — **dSFT**: the teacher answers every training prompt (``teacher.jsonl``, append-only,
   keyed by row id; greedy unless ``zephyr.sft_temperature`` > 0) — or ``zephyr.sft_data`` holds
   answers written elsewhere (``kdistill generate``, e.g. with an API teacher) — and the student is
   trained with cross-entropy on those answers (sequence-level KD, Kim & Rush 2016: the loss of
   ``method: sequence``) through the shared trainer (``checkpoints/``, ``metrics.jsonl``;
   ``zephyr.sft_max_steps`` steps).
2. ``2-feedback/`` — **AI feedback**: for each prompt, ``zephyr.candidates`` answers sampled from the
   dSFT student plus one greedy answer from each of ``zephyr.other_models``; the teacher rates every
   candidate (``zephyr.scorer``: ``judge`` = its expected rating on a judge prompt, computed from its
   next-token probabilities of the rating tokens, see ``rating``; ``loglik`` = its mean
   log-likelihood of the answer). Best = chosen; rejected = a random lower-rated one (or the worst).
   ``candidates.jsonl`` (append-only per prompt) and ``pairs.jsonl``.
3. ``3-dpo/`` — **dDPO**: DPO on the pairs with the frozen dSFT student as the reference
   (``dpo.beta``, ``dpo.max_steps``, ``dpo.learning_rate``).

A stage with ``done.json`` is skipped on rerun (its ``student/`` is loaded); an interrupted training
stage resumes from its own ``checkpoints/``; an interrupted generation stage continues with the
prompts it had not finished. Finally the teacher judges the final student against the dSFT student
on held-out prompts (greedy answers): ``win_rate`` = (wins + ties/2) / prompts.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from kdistill.data import Example, Renderer, completion_feature, encode_examples, load_examples
from kdistill.methods.base import Method, RunContext, register
from kdistill.methods.candidates import RatingConfig, api_teacher, score_candidates
from kdistill.methods.dpo import DPOConfig, dpo_stage, encode_pair
from kdistill.models import eos_ids, hf_model, load_model, load_saved, save_model
from kdistill.sampling import make_sampler, sample_completions, sample_texts
from kdistill.settings import Section
from kdistill.stages import combine_metrics, process_seed, train_config
from kdistill.store import JsonlStore, run_stage, write_json, write_jsonl
from kdistill.vllm_engine import import_vllm

class ZephyrConfig(Section):
    """``method: zephyr`` — 1. dSFT on teacher answers, 2. AI feedback (candidates rated by the teacher),
    3. dDPO against the frozen dSFT student (see ``dpo``). Each stage resumes; a finished one is skipped."""

    sft_max_steps: Optional[int] = Field(None, ge=1, description="dSFT optimizer steps (none = train.max_steps)")
    sft_data: Optional[str] = Field(
        None, description="teacher answers already written (e.g. by `kdistill generate` with an API teacher); none = the local teacher answers"
    )
    sft_temperature: float = Field(0.0, ge=0.0, description="teacher answers: 0 = greedy")
    max_new_tokens: int = Field(64, ge=1, description="longest teacher answer / candidate")
    candidates: int = Field(4, ge=2, description="student samples per prompt for AI feedback")
    candidate_temperature: float = Field(1.0, gt=0.0)
    other_models: list[str] = Field(default_factory=list, description="more models (folders/hub ids) adding one candidate each")
    scorer: Literal["judge", "loglik"] = Field("judge", description="how the teacher rates candidates (see rating)")
    rejected: Literal["random", "worst"] = Field("random", description="rejected = a random lower-rated candidate, or the worst")
    min_margin: float = Field(0.0, ge=0.0, description="skip prompts whose best and rejected scores differ by no more than this")
    feedback_prompts: Optional[int] = Field(None, ge=1, description="training prompts used for AI feedback; none = all")
    win_rate_prompts: int = Field(32, ge=1, description="held-out prompts for the final-vs-dSFT win rate")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="how the student's AI-feedback candidates are sampled (vllm: see vllm:)"
    )


def _example(row: dict) -> Example:
    return Example(id=row["id"], messages=row["messages"], response=None)


def _last_loss(stage_dir: Path):
    p = stage_dir / "metrics.jsonl"
    if not p.is_file():
        return None
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return rows[-1]["loss"] if rows else None


@register
class Zephyr(Method):
    name = "zephyr"
    sections = {"zephyr": ZephyrConfig, "dpo": DPOConfig, "rating": RatingConfig}
    needs_responses = False  # the teacher and the student write the answers
    single_pass = False

    @classmethod
    def teacher_needs(cls, cfg) -> frozenset:
        # answers and ratings; scorer: loglik rates with a local teacher's probabilities (checked below)
        return frozenset({"text", "judge"})

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.zc = ctx.cfg.zephyr
        self.api = api_teacher(ctx)  # a text-only teacher: answers and ratings over HTTP
        self.teacher: Optional[torch.nn.Module] = None if self.api is not None else ctx.teacher.model
        if self.api is not None and self.zc.scorer != "judge":
            raise ValueError("zephyr.scorer: loglik needs the teacher's token probabilities; with an API teacher "
                             "use scorer: judge")
        self.stages: dict = {}
        self.root = Path(ctx.output_dir) / "zephyr"
        self.sampler = None
        if self.zc.engine == "vllm":
            import_vllm("zephyr.engine")  # fail before any work when it is missing

    # -- stage 1: dSFT ------------------------------------------------------------------------------
    def sft(self, student, runner):
        sdir = self.root / "1-sft"
        return run_stage(sdir, lambda: self._sft(student, runner, sdir), lambda done: load_saved(student, sdir / "student"))

    def _sft(self, student, runner, sdir: Path):
        ctx, zc = self.ctx, self.zc
        t0 = time.time()
        tok, renderer, max_len = ctx.tokenizer, ctx.renderer, ctx.cfg.data.max_length
        eos = set(eos_ids(self.teacher, tok)) if self.teacher is not None else set()
        torch.manual_seed(process_seed(ctx.cfg.train.seed))
        if zc.sft_data is None:
            runner.say(f"zephyr 1/3 dSFT: the teacher answers {len(ctx.train_examples)} prompts")

        def answer_api(examples):  # failed requests are not stored: a rerun asks again
            texts = self.api.answer([e.messages for e in examples], zc.sft_temperature, zc.max_new_tokens)
            return [{"id": e.id, "messages": e.messages, "prompt": e.prompt, "response": t.strip(),
                     "finish_reason": "stop", "teacher": self.api.name, "temperature": zc.sft_temperature}
                    for e, t in zip(examples, texts) if t is not None and t.strip()]

        def answer(examples):
            prompts = [renderer.prompt_ids(e) for e in examples]
            room = max(1, min(zc.max_new_tokens, max_len - max(len(p) for p in prompts)))
            comps = sample_completions(self.teacher, tok, prompts, room, zc.sft_temperature, ctx.cfg.eval.batch_size)
            return [{"id": e.id, "messages": e.messages, "prompt": e.prompt,
                     "response": tok.decode(c, skip_special_tokens=True).strip(),
                     "finish_reason": "stop" if c and c[-1] in eos else "length",
                     "teacher": ctx.cfg.teacher.model, "temperature": zc.sft_temperature,
                     "prompt_ids": p, "completion_ids": c} for e, p, c in zip(examples, prompts, comps)]

        if zc.sft_data is not None:  # answers written elsewhere (kdistill generate, an API teacher)
            given = load_examples(zc.sft_data)
            rows = [{"id": e.id, "finish_reason": e.extra.get("finish_reason", "stop")} for e in given]
            feats, _ = encode_examples(renderer, given)
        else:
            store = JsonlStore(sdir / "teacher.jsonl")
            rows = store.fill(ctx.train_examples, lambda e: e.id, answer_api if self.api is not None else answer,
                              ctx.cfg.eval.batch_size, desc="teacher answers" if runner.progress else None,
                              allow_missing=self.api is not None)
            if not rows:
                raise ValueError("zephyr dSFT: the API teacher answered no prompt (see the log; rerun to retry)")
            feats = [completion_feature(r["prompt_ids"], r["completion_ids"], r["id"], max_len) if "completion_ids" in r
                     else renderer.encode(Example(r["id"], r["messages"], r["response"])) for r in rows]
        runner.say(f"zephyr 1/3 dSFT: training on {len(feats)} teacher answers")
        student, result = runner.train(student, Method(ctx), feats, sdir,
                                       tcfg=train_config(ctx.cfg.train, max_steps=zc.sft_max_steps))
        save_model(student, sdir / "student")
        summary = {"teacher_answers": len(rows), "finished_answers": sum(r["finish_reason"] == "stop" for r in rows),
                   "steps": result.steps, "resumed_from": result.resumed_from, "final_loss": _last_loss(sdir),
                   "seconds": round(time.time() - t0, 1), "heldout": runner.evaluate(student)}
        return student, summary

    # -- stage 2: AI feedback -----------------------------------------------------------------------
    def _other_models(self):
        out = []
        for spec in self.zc.other_models:
            model, tok = load_model(spec, "zephyr.other_models")
            model.to(self.ctx.device)
            out.append((spec, model, tok, Renderer(tok, self.ctx.cfg.data.max_length, self.ctx.cfg.data.system_prompt,
                                                   self.ctx.cfg.data.chat_template)))
        return out

    def feedback(self, student, runner):
        fdir = self.root / "2-feedback"
        return run_stage(fdir, lambda: self._feedback(student, runner, fdir),
                         lambda done: [json.loads(l) for l in (fdir / "pairs.jsonl").read_text().splitlines() if l.strip()])

    def _feedback(self, student, runner, fdir: Path):
        ctx, zc = self.ctx, self.zc
        t0 = time.time()
        tok, renderer = ctx.tokenizer, ctx.renderer
        prompts = list(ctx.train_examples)
        if zc.feedback_prompts is not None and zc.feedback_prompts < len(prompts):
            prompts = random.Random(ctx.cfg.train.seed).sample(prompts, zc.feedback_prompts)
        others = self._other_models() if zc.other_models else []
        torch.manual_seed(process_seed(ctx.cfg.train.seed + 1))
        runner.say(f"zephyr 2/3 AI feedback: {zc.candidates} student samples per prompt"
                   + (f" + {len(others)} other models" if others else "") + f", rated by the teacher ({zc.scorer})")

        self.sampler = make_sampler(zc.engine, "zephyr.engine", ctx, student, ctx.cfg.eval.batch_size)

        def rate(examples):
            pids = [renderer.prompt_ids(e) for e in examples]
            room = max(1, min(zc.max_new_tokens, ctx.cfg.data.max_length - max(len(p) for p in pids)))
            comps = self.sampler(student, pids, room, zc.candidate_temperature, num_samples=zc.candidates)
            cands = [[{"text": tok.decode(comps[j * zc.candidates + k], skip_special_tokens=True).strip(),
                       "source": "student"} for k in range(zc.candidates)] for j in range(len(examples))]
            for spec, model, otok, orend in others:
                texts = sample_texts(model, otok, [orend.prompt_ids(e) for e in examples], zc.max_new_tokens,
                                 ctx.cfg.eval.batch_size)
                for j, t in enumerate(texts):
                    cands[j].append({"text": t, "source": spec})
            flat = [(e, c) for e, cs in zip(examples, cands) for c in cs]
            feats = [renderer.encode(e, response=c["text"]) for e, c in flat]
            scores = score_candidates(zc.scorer, ctx, self.teacher, [e.prompt for e, _ in flat], feats,
                                      [c["text"] for _, c in flat])
            for (e, c), s in zip(flat, scores):
                c["score"] = round(float(s), 6)
            return [{"id": e.id, "prompt": e.prompt, "messages": e.messages, "candidates": cs}
                    for e, cs in zip(examples, cands)]

        rows = JsonlStore(fdir / "candidates.jsonl").fill(prompts, lambda e: e.id, rate, ctx.cfg.eval.batch_size,
                                                          desc="AI feedback" if runner.progress else None)
        pairs, ties = [], 0
        for row in rows:
            cs = sorted(row["candidates"], key=lambda c: -c["score"])
            best = cs[0]
            worse = [c for c in cs[1:] if best["score"] - c["score"] > zc.min_margin and c["text"] != best["text"]]
            if not worse:
                ties += 1
                continue
            rej = worse[-1] if zc.rejected == "worst" else random.Random(f"{ctx.cfg.train.seed}:{row['id']}").choice(worse)
            pairs.append({"id": row["id"], "prompt": row["prompt"], "messages": row["messages"],
                          "chosen": best["text"], "rejected": rej["text"],
                          "score_chosen": best["score"], "score_rejected": rej["score"],
                          "source_chosen": best["source"], "source_rejected": rej["source"]})
        write_jsonl(fdir / "pairs.jsonl", pairs)
        all_scores = [c["score"] for r in rows for c in r["candidates"]]
        n = max(1, len(pairs))
        summary = {
            "prompts": len(rows), "candidates": len(all_scores), "pairs": len(pairs), "skipped_no_margin": ties,
            "scorer": zc.scorer, "mean_score": round(sum(all_scores) / max(1, len(all_scores)), 6),
            "mean_chosen_score": round(sum(p["score_chosen"] for p in pairs) / n, 6),
            "mean_rejected_score": round(sum(p["score_rejected"] for p in pairs) / n, 6),
            "chosen_sources": {s: sum(p["source_chosen"] == s for p in pairs) for s in {p["source_chosen"] for p in pairs}},
            "seconds": round(time.time() - t0, 1),
        }
        for _, model, _, _ in others:
            del model
        return pairs, summary

    # -- final comparison ------------------------------------------------------------------------
    def win_rate(self, final, dsft, runner) -> dict:
        ctx, zc = self.ctx, self.zc
        rows = list(runner.eval_rows)[: zc.win_rate_prompts]
        if not rows:
            return {}
        renderer, bs = ctx.renderer, ctx.cfg.eval.batch_size
        pids = [renderer.prompt_ids(e) for e in rows]
        a = sample_texts(hf_model(final), ctx.tokenizer, pids, zc.max_new_tokens, bs)
        b = sample_texts(hf_model(dsft), ctx.tokenizer, pids, zc.max_new_tokens, bs)
        texts = a + b
        exs = rows + rows
        feats = [renderer.encode(e, response=t) for e, t in zip(exs, texts)]
        s = score_candidates(zc.scorer, ctx, self.teacher, [e.prompt for e in exs], feats, texts)
        sa, sb = s[: len(rows)], s[len(rows):]
        wins = sum(x > y + 1e-6 for x, y in zip(sa, sb))
        ties = sum(abs(x - y) <= 1e-6 for x, y in zip(sa, sb))
        out = {"prompts": len(rows), "wins": wins, "ties": ties, "losses": len(rows) - wins - ties,
               "win_rate": round((wins + 0.5 * ties) / len(rows), 4), "judge": zc.scorer,
               "mean_score_final": round(sum(sa) / len(sa), 6), "mean_score_dsft": round(sum(sb) / len(sb), 6),
               "samples": [{"prompt": e.prompt, "final": x, "dsft": y} for e, x, y in list(zip(rows, a, b))[:3]]}
        write_json(self.root / "win_rate.json", out)
        return out

    # -- the stages ----------------------------------------------------------------------------
    def fit(self, student, runner):
        ctx = self.ctx
        t0 = time.time()
        student, self.stages["sft"] = self.sft(student, runner)
        dsft = copy.deepcopy(hf_model(student)).eval()
        for p in dsft.parameters():
            p.requires_grad_(False)
        pairs, self.stages["feedback"] = self.feedback(dsft, runner)
        encoded, skipped = [], 0
        for p in pairs:
            f = encode_pair(ctx.renderer, _example(p), p["chosen"], p["rejected"], p["id"])
            if f is None:
                skipped += 1
            else:
                encoded.append(f)
        runner.say(f"zephyr 3/3 dDPO on {len(encoded)} pairs (beta={ctx.cfg.dpo.beta}), reference = the dSFT student")
        tcfg = train_config(ctx.cfg.train, max_steps=ctx.cfg.dpo.max_steps, learning_rate=ctx.cfg.dpo.learning_rate)
        student, self.stages["dpo"] = dpo_stage(ctx, runner, student, dsft, encoded, self.root / "3-dpo",
                                                ctx.cfg.dpo.beta, ctx.cfg.dpo.label_smoothing, tcfg)
        self.stages["dpo"]["pairs_skipped_max_length"] = skipped
        self.stages["win_rate_vs_dsft"] = self.win_rate(student, dsft, runner)
        del dsft
        combine_metrics(ctx.output_dir, [("dsft", self.root / "1-sft"), ("ddpo", self.root / "3-dpo")])
        resumed = [k for k in ("sft", "dpo") if self.stages[k].get("resumed_from")]
        return student, {"steps": self.stages["sft"]["steps"] + self.stages["dpo"]["steps"],
                         "seconds": round(time.time() - t0, 1), "train_rows": self.stages["sft"]["teacher_answers"],
                         "resumed_from": ", ".join(f"{k} step {self.stages[k]['resumed_from']}" for k in resumed) or None,
                         "stopped_early": False}

    def summary(self) -> dict:
        wr = self.stages.get("win_rate_vs_dsft") or {}
        dpo = self.stages.get("dpo") or {}
        return {
            **({"api_teacher": dict(self.api.stats)} if self.api is not None else {}),
            "win_rate_vs_dsft": wr.get("win_rate"),
            "dpo_reward_margin": (dpo.get("after") or {}).get("reward_margin"),
            "dpo_reward_accuracy": (dpo.get("after") or {}).get("reward_accuracy"),
            "stages": self.stages,
            "candidate_engine": self.zc.engine,
            **({"engine_" + k: v for k, v in self.sampler.stats.items()} if self.sampler is not None else {}),
            "data": "zephyr/1-sft/teacher.jsonl, zephyr/2-feedback/{candidates,pairs}.jsonl, zephyr/win_rate.json",
        }

