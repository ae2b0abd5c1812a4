"""Retention you can trust: what the run adds beside its held-out figures, at four points.

* after the rows are read: the **contamination** check (held-out prompts among the training ones);
* with the baseline and final figures: **standard benchmarks** through lm-evaluation-harness for the
  teacher, the initial and the trained student (``eval.benchmarks``), and the **blind judge**
  (``eval.judge.prompts``): teacher vs student answers compared by the teacher or an API model,
  each pair in both orders;
* in the report: the answers' length distribution and echo share, the benchmark table, the
  capability table (retention per task and group, flagged under ``report.retention_floor``),
  cost per million generated tokens (``report.cost_per_hour``), and the final figures sent to the
  tracker (``train.report_to``).

The run (:mod:`kdistill.run`) calls :class:`TrustChecks` at those points; everything it needs is
read from the run's state, and each check is its own module (:mod:`kdistill.holdout`,
:mod:`kdistill.lm_eval_bridge`, :mod:`kdistill.judging`, :mod:`kdistill.answer_stats`).
"""

from __future__ import annotations

from typing import Optional

from kdistill import trackers
from kdistill.answer_stats import profiles
from kdistill.errors import ConfigError
from kdistill.judging import api_pair_judge, blind_compare, correctness_judge, judge_evidence, local_pair_judge
from kdistill.lm_eval_bridge import Benchmarks, benchmark_table
from kdistill.report import headline
from kdistill.sampling import sample_texts
from kdistill.holdout import contamination
from kdistill.teachers import teacher_configs
from kdistill.teachers.text import ApiTextTeacher
from kdistill.trust_report import capability_table, cost_figures


class TrustChecks:
    """The checks of one run (``run``: a :class:`kdistill.run.Run`, read as it fills in)."""

    def __init__(self, run):
        self.run = run
        self.cfg = run.cfg
        self.bench: Optional[Benchmarks] = None
        self.bench_results: dict = {}
        self.bench_unavailable: dict = {}
        self.contamination: Optional[dict] = None
        self.judge_result: Optional[dict] = None
        self._judge = None
        self._answer_judge = None

    # -- after the rows --------------------------------------------------------------------------

    def after_rows(self) -> None:
        r, cfg = self.run, self.cfg
        if r.eval_rows and r.train_rows:
            c = contamination(r.train_rows, r.eval_rows, cfg.eval.near_duplicate)
            self.contamination = c
            if c["exact"] or c["near_duplicate"]:
                r.say(f"WARNING: contamination: {c['exact'] + c['near_duplicate']} of {c['held_out']} held-out prompts "
                      f"also appear in the training rows ({c['exact']} exact, {c['near_duplicate']} near-duplicate); "
                      "held-out figures overstate how far the student generalizes")
        if cfg.eval.match == "judge" and r.t_model is None and cfg.eval.judge.api is None:
            raise ConfigError("eval.match: judge needs a judge: a local teacher (teacher.model) or eval.judge.api "
                              "(an API teacher's own answers are scored as text: use exact, first_line or regex)")
        if cfg.eval.benchmarks is not None:
            self.bench = Benchmarks(cfg.eval.benchmarks, r.out / "benchmarks", r.say)

    def pair_judge(self):
        """The judge: ``eval.judge.api``, else the local teacher, else an API teacher's chat side; or None."""
        if self._judge is None:
            r, jc = self.run, self.cfg.eval.judge
            if jc.api is not None:
                self._judge = api_pair_judge(ApiTextTeacher(jc.api))
            elif r.t_model is not None:
                model, tok = r.t_weights
                self._judge = local_pair_judge(model, tok, max(1024, 4 * self.cfg.data.max_length),
                                               self.cfg.data.chat_template, self.cfg.eval.batch_size, r.device)
            elif r.teacher is not None and r.teacher.text is not None:
                self._judge = api_pair_judge(r.teacher.text)
        return self._judge

    def answer_judge(self):
        """``eval.match: judge``: ``(rows, answers) -> [correct?]`` (verdicts kept in ``judge_correct.jsonl``)."""
        if self.cfg.eval.match != "judge":
            return None
        if self._answer_judge is None:
            prefer = self.pair_judge()
            if prefer is not None:
                self._answer_judge = correctness_judge(prefer, self.cfg.eval.judge.correct_template,
                                                       self.run.out / "judge_correct.jsonl")
        return self._answer_judge

    # -- benchmarks ------------------------------------------------------------------------------

    def _bench_local(self, who: str, model, tok) -> None:
        with self.run.acc.main_process_first():  # one process evaluates; the others read its results
            self.bench_results[who] = self.bench.local(who, model, tok)

    def baseline(self) -> None:
        r = self.run
        if self.bench is None:
            return
        if r.t_model is not None:
            self._bench_local("teacher", *r.t_weights)
        else:
            api = next((s.api for s in teacher_configs(self.cfg) if s.api is not None), None)
            if api is not None:
                with r.acc.main_process_first():
                    self.bench_results["teacher"], self.bench_unavailable = self.bench.api("teacher", api)
            else:
                why = "no teacher model or API to run (a cache holds only training-row log-probs)"
                self.bench_unavailable = {t.name: why for t in self.cfg.eval.benchmarks.task_list()}
        if r.training:
            self._bench_local("student_initial", r.student, r.tokenizer)

    # -- final -----------------------------------------------------------------------------------

    def final(self) -> None:
        r = self.run
        if self.bench is not None:
            self._bench_local("student", r.student, r.tokenizer)
        if self.cfg.eval.judge.prompts and r.acc.is_main_process:
            self.judge_result = self._blind()

    def _answers(self, ev: dict, rows: list) -> dict:
        with_ref = [e for e in self.run.eval_rows if e.reference is not None]
        outs = ev.get("outputs") or []
        have = {e.id: o for e, o in zip(with_ref, outs)} if len(outs) == len(with_ref) else {}
        return {e.id: have[e.id] for e in rows if e.id in have}

    def _blind(self) -> dict:
        """Teacher vs student on the first ``eval.judge.prompts`` held-out prompts, judged blind."""
        r, cfg = self.run, self.cfg
        prefer = self.pair_judge()
        if prefer is None:
            return {"unavailable": "no judge: give teacher.model, an API teacher, or eval.judge.api"}
        rows = r.eval_rows[: cfg.eval.judge.prompts]
        new = cfg.eval.judge.max_new_tokens or cfg.eval.max_new_tokens
        t_ans = self._answers(r.teacher_ev, rows)
        s_ans = self._answers(r.final_ev, rows)
        todo = [e for e in rows if e.id not in t_ans]
        if todo:
            if r.t_model is not None:
                model, tok = r.t_weights
                rend = r.eval_renderer if r.same_vocab else r.renderer_for(tok)
                got = sample_texts(model, tok, [rend.prompt_ids(e) for e in todo], new, cfg.eval.batch_size)
            elif r.teacher is not None and r.teacher.text is not None:
                got = r.teacher.text.answer([e.messages for e in todo], 0.0, new)
            else:
                return {"unavailable": "the teacher cannot answer here (no model or API)"}
            t_ans.update({e.id: a for e, a in zip(todo, got) if a is not None})
        todo = [e for e in rows if e.id not in s_ans]
        if todo:
            got = sample_texts(r.student, r.tokenizer, [r.eval_renderer.prompt_ids(e) for e in todo], new,
                               cfg.eval.batch_size)
            s_ans.update({e.id: a for e, a in zip(todo, got)})
        rows = [e for e in rows if e.id in t_ans and e.id in s_ans]
        r.say(f"blind judge: teacher vs student on {len(rows)} held-out prompts, each pair in both orders")
        out = blind_compare(rows, [t_ans[e.id] for e in rows], [s_ans[e.id] for e in rows], prefer,
                            cfg.eval.judge.compare_template, r.out / "judge_verdicts.jsonl")
        out["judge"] = ("api:" + cfg.eval.judge.api.model) if cfg.eval.judge.api is not None else "teacher"
        return out

    # -- report ----------------------------------------------------------------------------------

    def report(self, rep: dict) -> dict:
        """The trust sections added to ``rep`` (and the headline re-made with their notes)."""
        r, cfg = self.run, self.cfg
        evs = {"teacher": r.teacher_ev, "student_initial": r.initial_ev, "student": r.final_ev}
        rep["answers"] = profiles(r.eval_rows, {k: v for k, v in evs.items() if v is not None})
        rep["eval_match"] = cfg.eval.match
        if self.contamination is not None:
            rep["contamination"] = self.contamination
        if self.bench is not None:
            rep["benchmarks"] = benchmark_table(self.bench_results, self.bench.higher)
            if self.bench_unavailable:
                rep["benchmarks_unavailable"] = self.bench_unavailable
        if self.judge_result is not None:
            rep["judge"] = j = judge_evidence(self.judge_result)
            if not j.get("unreliable") and j.get("win_rate") is not None:
                rep["retention"]["judge"] = round(2 * j["win_rate"], 4)
        groups = {t.name: t.group for t in cfg.data.tasks or []}
        if cfg.eval.benchmarks is not None:
            groups.update({t.name: t.group for t in cfg.eval.benchmarks.task_list()})
        cap = capability_table(rep, groups, cfg.report.retention_floor)
        if cap is not None:
            rep["capabilities"] = cap
        if cfg.report.cost_per_hour is not None:
            rep["cost"] = cost_figures(rep.get("speed") or {}, cfg.report.cost_per_hour)
        rep["headline"] = headline(rep)
        trackers.finish(r.acc, rep)
        return rep
