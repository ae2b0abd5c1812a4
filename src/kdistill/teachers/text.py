"""A teacher that is text only: an OpenAI-compatible endpoint that answers and rates, nothing more.

Also the teacher figures any API teacher can give without token probabilities: accuracy from its
own greedy answers to the held-out prompts (:func:`answered_figures`, kept per row so a rerun asks
only for what is missing).
"""

from __future__ import annotations

from typing import Optional

from kdistill.data import Example
from kdistill.evaluate import by_task, matches
from kdistill.scoring import parse_score
from kdistill.store import JsonlStore
from kdistill.teachers.api import ApiError, ApiTeacher, Job
from kdistill.teachers.base import HeldOut, Teacher, register_teacher


def answered_figures(ho: HeldOut, api_cfg, served=None, answers_dir=None) -> dict:
    """An API teacher's held-out figures: accuracy from its greedy answers (kept in
    ``eval_teacher_answers.jsonl``: a rerun asks only for what is missing) and, for a teacher that
    gives log-probs (``served``, a :class:`~kdistill.teachers.served.ServedTeacher`), the perplexity
    of the held-out responses.

    Returns ``{"metrics", "outputs", "answered", "tasks"?}`` like :func:`kdistill.evaluate.by_task`:
    ``outputs`` follow the rows with a reference, ``tasks`` (two or more ``data.tasks``) holds each
    task's figures; rows the API did not answer are left out of the accuracy and counted in ``answered``.
    Raises :class:`~kdistill.teachers.api.ApiError` when the API cannot be used at all.
    """
    cfg, rows = ho.cfg, ho.rows
    with_ref = [e for e in rows if e.reference is not None]
    have: dict[str, str] = {}
    if with_ref and cfg.eval.generate:
        store = JsonlStore((answers_dir or ho.out) / "eval_teacher_answers.jsonl", shared=False)
        have = {k: r["answer"] for k, r in store.rows.items() if isinstance(r.get("answer"), str)}
        todo = [e for e in with_ref if e.id not in have]
        if todo:
            api = ApiTeacher(api_cfg)
            system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
            jobs = [Job(e.id, system + e.messages, 0.0, cfg.eval.max_new_tokens) for e in todo]

            def keep(job, c):
                if c.ok:
                    have[job.key] = c.text
                    store.append([{"id": job.key, "answer": c.text}])

            api.run(jobs, keep)

    def measure(sub: list[Example], sub_feats: list[dict]) -> dict:
        metrics: dict = {}
        ref = [e for e in sub if e.reference is not None]
        answered = [e for e in ref if e.id in have]
        if answered:
            metrics["accuracy"] = sum(matches(have[e.id], e.reference, cfg.eval.match, cfg.eval.answer_regex)
                                      for e in answered) / len(answered)
        if served is not None and sub_feats:
            ppl = served.perplexity(sub_feats, ho.pad_id, cfg.eval.batch_size)
            if ppl is not None:
                metrics["perplexity"] = ppl
        return {"metrics": {k: round(v, 6) for k, v in metrics.items()}, "outputs": [have.get(e.id, "") for e in ref]}

    ev = by_task(rows, ho.feats if served is not None and ho.feats else [], measure)
    ev["answered"] = sum(e.id in have for e in with_ref)
    return ev


@register_teacher
class ApiTextTeacher(Teacher):
    """The teacher as text only (``teacher.api`` without ``teacher.model``), for the methods that
    need its answers and its ratings but not its token probabilities: ``sequence`` (its answers),
    ``zephyr`` (dSFT answers, the AI-feedback judge, the win rate) and ``on_policy_filter`` /
    ``self_distill`` with ``scorer: judge``.
    """

    name_of_kind = "api"
    kind = "api"
    offers = frozenset({"text", "judge"})
    priority = 40
    what = "an API (text only: no token probabilities)"

    def __init__(self, cfg, system_prompt: Optional[str] = None):
        self.cfg = cfg
        self.api = ApiTeacher(cfg)
        self.name = f"api:{cfg.model} @ {cfg.base_url}"
        self.system_prompt = system_prompt
        self.stats = {"answers": 0, "ratings": 0, "failed": 0, "unparsable_ratings": 0}

    @classmethod
    def accepts(cls, spec) -> bool:
        return spec.api is not None and spec.model is None and spec.cache is None

    @classmethod
    def build(cls, spec, key: str, env) -> "ApiTextTeacher":
        t = cls(spec.api, env.cfg.data.system_prompt)
        t.key = key
        env.say(f"teacher: {t.name} (text only: its answers and ratings; no token probabilities)")
        return t

    @property
    def text(self) -> "ApiTextTeacher":
        return self

    def refuse(self, need: str, method: str, hint: str = "") -> str:
        if need in ("distribution", "any_sequence", "weights"):
            return (f"{self.key}.api: method {method} needs the teacher's token distributions, which an API does not "
                    f"give; use method: sequence (the teacher's answers)" + (f", {hint} (its answers and ratings)"
                                                                             if hint else "")
                    + f", or {self.key}.model / {self.key}.cache")
        return super().refuse(need, method, hint)

    def heldout(self, ho: HeldOut) -> dict:
        try:
            return answered_figures(ho, self.cfg)
        except ApiError as exc:
            ho.say(f"the API teacher could not be evaluated: {exc}")
            return {"metrics": {}, "outputs": [], "error": str(exc)}

    def unavailable(self, figures: dict) -> dict:
        why = "the teacher is an API (text only: no token probabilities)"
        out = {"perplexity": why, "kl_to_teacher": why, "top1_agreement": why}
        if "accuracy" not in figures.get("metrics", {}):
            out["accuracy"] = (f"the API teacher could not be evaluated ({figures['error']})" if figures.get("error")
                               else "no held-out row has a 'reference' (or eval.generate is off)")
        return out

    def describe(self) -> dict:
        return {"name": self.name, "params": None, "kind": self.kind}

    def _messages(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and not (messages and messages[0].get("role") == "system"):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def answer(self, conversations: list[list[dict]], temperature: float = 0.0, max_tokens: int = 256) -> list[Optional[str]]:
        """One answer per conversation (None where the request failed after its retries)."""
        jobs = [Job(i, self._messages(c), temperature, max_tokens) for i, c in enumerate(conversations)]
        out = [c.text if c.ok else None for c in self.api.complete_many(jobs)]
        self.stats["answers"] += len(out)
        self.stats["failed"] += sum(o is None for o in out)
        return out

    def rate(self, judge_prompts: list[str], scale: int, max_tokens: int = 8) -> list[Optional[float]]:
        """The judge's integer rating 1..``scale`` of each prompt (None: no answer or no valid number)."""
        answers = self.answer([[{"role": "user", "content": p}] for p in judge_prompts], 0.0, max_tokens)
        out: list[Optional[float]] = []
        for a in answers:
            v = parse_score(a)
            ok = v is not None and 1 <= v <= scale
            out.append(float(v) if ok else None)
            self.stats["unparsable_ratings"] += a is not None and not ok
        self.stats["ratings"] += len(out)
        return out
