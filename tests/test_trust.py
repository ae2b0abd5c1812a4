"""Retention you can trust: strict scoring modes, answer profiles (echo share), contamination,
whole-group held-out splits, the blind judge, cost figures, and a run that says it stopped early."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import base_config
from kdistill.answer_stats import answer_profile, echoes
from kdistill.config import load_config
from kdistill.data import Example
from kdistill.errors import ConfigError, DataError
from kdistill.evaluate import matches, scored_answers
from kdistill.judging import blind_compare, correctness_judge
from kdistill.holdout import contamination, split_by_group
from kdistill.trust_report import cost_figures, stop_note


def ex(i, prompt, reference=None, response=None, **extra) -> Example:
    return Example(id=str(i), messages=[{"role": "user", "content": prompt}], response=response, reference=reference,
                   extra=extra)


# -- scoring modes: each separated from `contains` by a case ---------------------------------------


def test_exact_folds_case_punctuation_space_but_not_extra_words():
    assert matches("Freya Meyer won the prize.", "Freya", "contains")
    assert not matches("Freya Meyer won the prize.", "Freya", "exact")
    assert matches("  freya. ", "Freya", "exact") and matches("Freya!", "freya", "exact")


def test_first_line_ignores_what_follows_but_not_what_precedes():
    assert matches("Lyon\nor maybe Paris", "Paris", "contains")
    assert not matches("Lyon\nor maybe Paris", "Paris", "first_line")
    out = "\nParis.\nIt has been the capital since 987."
    assert matches(out, "Paris", "first_line") and not matches(out, "Paris", "exact")


def test_regex_scores_the_extracted_group():
    pattern = r"Answer:\s*(\w+)"
    assert matches("Paris? No. Answer: Lyon", "Paris", "contains")
    assert not matches("Paris? No. Answer: Lyon", "Paris", "regex", pattern)
    assert matches("Let me think. Answer: Paris", "Paris", "regex", pattern)
    assert not matches("Paris", "Paris", "regex", pattern)  # no match at all = wrong


def test_regex_mode_needs_a_valid_pattern(tmp_path):
    with pytest.raises(ConfigError, match="eval.answer_regex: required"):
        load_config(None, ["eval.match=regex"], base={"output_dir": str(tmp_path), "teacher": {"model": "demo"}})
    with pytest.raises(ConfigError, match="not a valid regex"):
        load_config(None, ["eval.match=regex", "eval.answer_regex=(a"], base={"output_dir": str(tmp_path)})


def test_judge_mode_asks_the_judge_with_the_reference():
    rows = [ex(0, "capital of France?", "Paris", "not Paris"), ex(1, "capital of Italy?", "Rome", "Rome")]
    seen = []

    def prefer(prompts):  # scripted judge: "2" (correct) unless the answer is a negation
        seen.extend(prompts)
        return [1 if "Given answer: not" in p else 2 for p in prompts]

    class E:
        match, answer_regex = "judge", None

    assert scored_answers(rows, "contains")[0] == 1.0
    acc, outs = scored_answers(rows, E(), correctness_judge(prefer))
    assert acc == 0.5 and outs == ["not Paris", "Rome"]
    assert "Reference answer: Paris" in seen[0] and "Given answer: not Paris" in seen[0]
    with pytest.raises(ValueError, match="needs a judge"):
        scored_answers(rows, E())


# -- what answers look like --------------------------------------------------------------------------


def test_answer_profile_counts_echoes_and_lengths():
    p = "Extract the first name from this sentence: Freya Meyer won the chess tournament on Saturday."
    rows = [ex(i, p, "Freya") for i in range(4)]
    outs = ["Freya", "Freya Meyer won the chess tournament.", "The first name is Freya.", "Freya Meyer"]
    prof = answer_profile(rows, outs)
    assert prof["echo_share"] == 0.25  # only the second repeats five words of the question
    assert prof["words"]["max"] == 6 and prof["words"]["median"] == 3.5 and prof["answers"] == 4
    assert echoes("freya meyer WON the chess!", p) and not echoes("Freya", p)


# -- is the held-out set held out? -------------------------------------------------------------------


def test_contamination_finds_exact_and_near_duplicates():
    base = "please summarise the following long paragraph about the history of the city of london in two lines"
    train = [ex(f"t{i}", f"question number {i} about something else entirely") for i in range(50)]
    train += [ex("dup", base), ex("x", "What is the capital of France?")]
    held = [ex("h1", "what is the CAPITAL of france"),  # exact after normalisation
            ex("h2", base.replace("two lines", "two short lines")),  # near duplicate
            ex("h3", "a completely different request about cooking rice")]
    c = contamination(train, held, threshold=0.7)
    assert (c["exact"], c["near_duplicate"], c["held_out"]) == (1, 1, 3)
    kinds = {e["id"]: (e["kind"], e["train_id"]) for e in c["examples"]}
    assert kinds == {"h1": ("exact", "x"), "h2": ("near_duplicate", "dup")}
    assert contamination(train, held, threshold=0.99)["near_duplicate"] == 0


def test_holdout_by_holds_out_whole_groups():
    rows = [ex(i, f"p{i}", template=f"t{i % 10}") for i in range(100)]
    train, held = split_by_group(rows, "template", 0.25, seed=0)
    tr_groups, he_groups = {e.extra["template"] for e in train}, {e.extra["template"] for e in held}
    assert not tr_groups & he_groups and len(train) + len(held) == 100
    assert 25 <= len(held) < 40 and len(he_groups) == 3
    assert split_by_group(rows, "template", 0.25, seed=0)[1] == held  # deterministic
    with pytest.raises(DataError, match="has no 'phrasing' field"):
        split_by_group(rows, "phrasing", 0.25, seed=0)


def test_holdout_by_in_a_run_config(tiny, tmp_path):
    from kdistill.run import Run

    rows = [json.loads(l) for l in (tiny / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["topic"] = r["reference"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [], base=base_config(tiny, tmp_path / "o", data={"train": str(path), "eval": None,
                                                                              "holdout_by": "topic"}))
    train, held = Run(cfg).read_rows()
    assert held and not {e.extra["topic"] for e in train} & {e.extra["topic"] for e in held}
    cfg = load_config(None, [], base=base_config(tiny, tmp_path / "o", data={"holdout_by": "topic"}))
    with pytest.raises(ConfigError, match="data.holdout_by: .*data.eval is set"):
        Run(cfg).read_rows()


# -- the blind judge -----------------------------------------------------------------------------------


def test_blind_judge_swaps_the_order_and_counts_ties_half(tmp_path):
    rows = [ex(i, f"question {i}") for i in range(4)]
    teacher = ["good answer 0", "bad answer 1", "good answer 2", "same"]
    student = ["bad answer 0", "good answer 1", "good one 2", "same"]
    calls = []

    def prefer(prompts):  # prefers the answer saying "good" (the first on a tie): a position-biased judge
        calls.append(list(prompts))
        out = []
        for p in prompts:
            first = p.split("Answer 1: ")[1].split("\n")[0]
            second = p.split("Answer 2: ")[1].split("\n")[0]
            out.append(2 if "good" in second and "good" not in first else 1)
        return out

    res = blind_compare(rows, teacher, student, prefer, keep=tmp_path / "v.jsonl")
    asked = calls[0]
    assert len(asked) == 6  # 3 pairs (the identical one is a tie without asking), each in both orders
    for i in range(3):  # the second call shows the same pair with the order swapped
        assert f"Answer 1: {teacher[i]}" in asked[i] and f"Answer 2: {student[i]}" in asked[i]
        assert f"Answer 1: {student[i]}" in asked[3 + i] and f"Answer 2: {teacher[i]}" in asked[3 + i]
    # row 0 loss, row 1 win, row 2: both "good" -> the judge picks the first both times -> tie; row 3 identical
    assert (res["wins"], res["losses"], res["ties"]) == (1, 1, 2)
    assert res["win_rate"] == 0.5 and res["identical_answers"] == 1 and res["position_consistency"] == round(2 / 3, 4)
    again = blind_compare(rows, teacher, student, prefer, keep=tmp_path / "v.jsonl")
    assert len(calls) == 1 and again["wins"] == 1  # the verdicts were kept: no second round of questions


def test_cost_per_million_tokens():
    c = cost_figures({"teacher": {"tokens_per_s": 100.0, "peak_memory_mb": 500.0},
                      "student": {"tokens_per_s": 400.0, "peak_memory_mb": 200.0}}, per_hour=3.6)
    assert c["teacher"]["cost_per_million_tokens"] == 10.0 and c["student"]["cost_per_million_tokens"] == 2.5
    assert c["student_cost_share"] == 0.25


# -- a run that says what happened ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tiny, tmp_path_factory):
    """A tiny run cut by train.max_minutes after its first step, with tensorboard, cost, strict
    scoring and the blind judge on."""
    from kdistill.run import run

    out = tmp_path_factory.mktemp("stopped")
    cfg = load_config(None, [], base=base_config(
        tiny, out, train={"max_steps": 6, "max_minutes": 1e-6, "report_to": "tensorboard"},
        eval={"match": "exact", "judge": {"prompts": 4}}, report={"cost_per_hour": 2.0}))
    return out, run(cfg, say=lambda m: None, progress=False)


def test_stopped_by_max_minutes_is_said_everywhere(stopped_run):
    out, rep = stopped_run
    said = "stopped by train.max_minutes at step 1 of 6"
    assert rep["training"]["stopped_by"] == "train.max_minutes" and rep["training"]["steps"] == 1
    assert said in rep["headline"] and "--set train.max_minutes=" in rep["headline"]
    assert said in (out / "report.md").read_text()
    assert said in (out / "student" / "README.md").read_text()
    assert "pypi.org" not in (out / "student" / "README.md").read_text()
    assert stop_note({"steps": 6, "planned_steps": 6}) is None


def test_a_judge_whose_verdict_follows_the_order_is_no_evidence():
    from kdistill.judging import judge_evidence

    biased = {"prompts": 32, "wins": 0, "ties": 32, "losses": 0, "win_rate": 0.5, "position_consistency": 0.0}
    marked = judge_evidence(biased)
    assert "no evidence" in marked["unreliable"] and "0%" in marked["unreliable"] and "unreliable" not in biased
    sound = {**biased, "wins": 10, "ties": 22, "win_rate": 0.6563, "position_consistency": 0.8}
    assert "unreliable" not in judge_evidence(sound)
    assert "unreliable" not in judge_evidence({**biased, "position_consistency": None})  # all identical: nothing judged


def test_report_has_answers_judge_cost_and_contamination(stopped_run):
    out, rep = stopped_run
    assert rep["eval_match"] == "exact" and set(rep["answers"]) >= {"teacher", "student"}
    assert 0 <= rep["answers"]["student"]["echo_share"] <= 1 and rep["answers"]["student"]["answers"] == 16
    j = rep["judge"]
    assert j["prompts"] == 4 and j["wins"] + j["ties"] + j["losses"] == 4
    if j.get("unreliable"):  # a tiny random judge: its verdicts follow the order
        assert "judge" not in rep["retention"] and "**Not evidence:**" in (out / "report.md").read_text()
    else:
        assert rep["retention"]["judge"] == 2 * j["win_rate"]
    assert rep["cost"]["student"]["cost_per_million_tokens"] > 0
    assert rep["contamination"]["held_out"] == 16
    md = (out / "report.md").read_text()
    for part in ("## Answers (scored with eval.match: exact)", "echo share", "## Blind judge", "cost per 1M generated",
                 "## Contamination"):
        assert part in md


def test_tensorboard_event_file_holds_the_loss(stopped_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rep = stopped_run
    files = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert files
    loss = {}
    for f in files:
        ea = EventAccumulator(str(f))
        ea.Reload()
        tags = ea.Tags()["scalars"]
        if "loss" in tags:
            loss = {e.step: e.value for e in ea.Scalars("loss")}
        if "final/student_accuracy" in tags:
            assert ea.Scalars("final/student_accuracy")[0].value == pytest.approx(rep["student"]["metrics"]["accuracy"])
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert loss == {1: pytest.approx(metrics[0]["loss"], rel=1e-5)}


def test_interrupt_stops_training_and_the_report_says_so(tiny, tmp_path, monkeypatch):
    from kdistill.methods import logit
    from kdistill.run import run

    real, calls = logit.LogitMethod.loss, {"n": 0}

    def ctrl_c_at_second_step(self, model, batch, num_items):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C
        return real(self, model, batch, num_items)

    monkeypatch.setattr(logit.LogitMethod, "loss", ctrl_c_at_second_step)
    cfg = load_config(None, [], base=base_config(tiny, tmp_path / "o", train={"max_steps": 5},
                                                 eval={"generate": False, "speed_prompts": 0}))
    before = signal.getsignal(signal.SIGINT)
    rep = run(cfg, say=lambda m: None, progress=False)
    assert "stopped by interrupt at step 2 of 5" in rep["headline"] and "rerun the same command" in rep["headline"]
    assert (tmp_path / "o" / "checkpoints" / "step-2").is_dir()
    assert signal.getsignal(signal.SIGINT) is before  # a second Ctrl-C interrupts as usual again


def test_capability_table_groups_and_flags_under_the_floor():
    from kdistill.trust_report import capability_table

    rep = {"tasks": {"qa": {"retention": {"accuracy": 0.9}}, "math": {"retention": {"accuracy": 0.5}}},
           "benchmarks": {"arc": {"acc": {"teacher": 0.5, "student": 0.45, "retention": 0.9}},
                          "gsm": {"exact_match": {"teacher": 0.4, "student": 0.1, "retention": 0.25}}}}
    cap = capability_table(rep, {"qa": "language", "arc": "reasoning", "gsm": "reasoning", "math": "reasoning"}, 0.8)
    groups = {g["name"]: (g["retention"], g["below_floor"], g["tasks"]) for g in cap["groups"]}
    assert groups == {"language": (0.9, False, ["qa"]), "reasoning": (0.55, True, ["math", "arc", "gsm"])}
    assert cap["below_floor"] == ["reasoning", "math", "gsm"]
