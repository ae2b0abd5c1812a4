"""The trust sections of a report: notes that qualify the headline, and their report.md lines.

Plain functions of ``report.json``'s dict (no models), used by :mod:`kdistill.report` for the
headline, ``report.md``, the model card and the plots, and by :mod:`kdistill.trust` to assemble
the capability table and the cost figures.
"""

from __future__ import annotations

from typing import Optional

PARITY_NOTE = "1.0 = parity with the teacher"


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


# -- notes on the headline -----------------------------------------------------------------------


def stop_note(training: Optional[dict]) -> Optional[str]:
    """"stopped by train.max_minutes at step 15 of 100; ..." when training ended before its plan."""
    tr = training or {}
    by, steps, planned = tr.get("stopped_by"), tr.get("steps"), tr.get("planned_steps")
    if not by:
        return None
    what = f"stopped by {by} at step {steps} of {planned}" if planned else f"stopped by {by} at step {steps}"
    if by == "train.max_minutes":
        hint = (f"rerun the same command with --set train.max_minutes=<more minutes> (or null) to continue from step "
                f"{steps}")
    elif by == "interrupt":
        hint = f"rerun the same command to continue from step {steps}"
    else:
        hint = "raise or unset train.max_steps to train every planned step"
    return f"Training {what}: {hint}."


def contamination_note(c: Optional[dict]) -> Optional[str]:
    if not c or not (c.get("exact") or c.get("near_duplicate")):
        return None
    n = c["exact"] + c["near_duplicate"]
    return (f"Warning: {n} of {c['held_out']} held-out prompts also appear in the training rows ({c['exact']} exact, "
            f"{c['near_duplicate']} near-duplicate): held-out figures overstate generalisation.")


def benchmark_sentence(rep: dict) -> str:
    """A headline from the benchmarks alone (``kdistill eval`` with only ``eval.benchmarks``)."""
    rets = [(t, r) for t, m in (rep.get("benchmarks") or {}).items() for r in [_primary(m)[1]] if r is not None]
    if not rets:
        return ""
    low = min(rets, key=lambda x: x[1])
    return (f"On {len(rets)} lm-eval benchmark task(s) the student keeps {sum(r for _, r in rets) / len(rets):.0%} of "
            f"the teacher's score on average (lowest: {low[0]}, {low[1]:.0%}).")


def notes(rep: dict) -> list[str]:
    return [n for n in (stop_note(rep.get("training")), contamination_note(rep.get("contamination"))) if n]


# -- tables ----------------------------------------------------------------------------------------


def _primary(metrics: dict) -> tuple[Optional[str], Optional[float]]:
    """The first metric with a retention (lm-eval lists a task's main metric first)."""
    for m, row in metrics.items():
        if row.get("retention") is not None:
            return m, row["retention"]
    return None, None


def capability_table(rep: dict, groups: dict, floor: float) -> Optional[dict]:
    """Retention per held-out task (``data.tasks``) and benchmark, aggregated per group (mean of its
    tasks), each flagged when under ``floor``. None when there is nothing per task."""
    rows = []
    for name, v in (rep.get("tasks") or {}).items():
        ret = v.get("retention") or {}
        metric = next((k for k in ("accuracy", "perplexity") if ret.get(k) is not None), None)
        if metric is not None:
            rows.append({"name": name, "source": "held-out", "metric": metric, "retention": ret[metric]})
    for name, metrics in (rep.get("benchmarks") or {}).items():
        metric, ret = _primary(metrics)
        if metric is not None:
            rows.append({"name": name, "source": "benchmark", "metric": metric, "retention": ret})
    if not rows or (len(rows) < 2 and not rep.get("benchmarks")):
        return None
    by_group: dict = {}
    for row in rows:
        row["group"] = groups.get(row["name"])
        row["below_floor"] = row["retention"] < floor
        if row["group"]:
            by_group.setdefault(row["group"], []).append(row)
    group_rows = [{"name": g, "tasks": [r["name"] for r in rs],
                   "retention": round(sum(r["retention"] for r in rs) / len(rs), 4)} for g, rs in by_group.items()]
    for g in group_rows:
        g["below_floor"] = g["retention"] < floor
    below = [r["name"] for r in group_rows + rows if r["below_floor"]]
    return {"floor": floor, "groups": group_rows, "tasks": rows, "below_floor": below}


def cost_figures(speed: dict, per_hour: float) -> dict:
    """Cost per million generated tokens = price per hour / (tokens/s · 3600) · 10^6, per model."""
    out: dict = {"cost_per_hour": per_hour}
    for who in ("teacher", "student"):
        tps = (speed.get(who) or {}).get("tokens_per_s")
        if tps:
            out[who] = {"tokens_per_s": tps, "peak_memory_mb": speed[who].get("peak_memory_mb"),
                        "cost_per_million_tokens": round(per_hour / (tps * 3600) * 1e6, 4)}
    t, s = out.get("teacher"), out.get("student")
    if t and s:
        out["student_cost_share"] = round(s["cost_per_million_tokens"] / t["cost_per_million_tokens"], 4)
    return out


# -- report.md -------------------------------------------------------------------------------------


def markdown(rep: dict) -> list[str]:
    """The trust sections of ``report.md`` (answers, judge, benchmarks, capabilities, contamination)."""
    lines: list[str] = []
    answers = rep.get("answers") or {}
    if answers:
        lines += [f"## Answers (scored with eval.match: {rep.get('eval_match', 'contains')})", "",
                  "| | answers | words: mean | p10 | median | p90 | max | echo share |", "|---|---|---|---|---|---|---|---|"]
        for who, p in answers.items():
            w = p["words"]
            lines.append(f"| {who} | {p['answers']} | {_f(w['mean'])} | {_f(w['p10'])} | {_f(w['median'])} | "
                         f"{_f(w['p90'])} | {w['max']} | {p['echo_share']:.1%} |")
        lines += ["", "Echo share: answers that repeat five or more consecutive words of the question.", ""]
    j = rep.get("judge")
    if j:
        lines += ["## Blind judge", ""]
        if j.get("unavailable"):
            lines += [f"Not measured: {j['unavailable']}.", ""]
        else:
            lines += [f"The {j.get('judge', 'teacher')} compared teacher and student answers on {j['prompts']} held-out "
                      f"prompts without references, each pair in both orders (a win or loss counts only when both "
                      f"orders agree): student wins {j['wins']}, ties {j['ties']}, loses {j['losses']}; **win rate "
                      f"{j['win_rate']:.2f}** (ties half; 0.5 = the judge cannot tell them apart; retention "
                      f"{2 * j['win_rate']:.2f}). Position consistency {_f(j.get('position_consistency'))}, identical "
                      f"answers {j.get('identical_answers', 0)}.", ""]
            if j.get("unreliable"):
                lines += [f"**Not evidence:** {j['unreliable']}.", ""]
    bench = rep.get("benchmarks") or {}
    if bench or rep.get("benchmarks_unavailable"):
        lines += ["## Benchmarks (lm-evaluation-harness)", "",
                  "| task | metric | teacher | student (initial) | student (trained) | retention |",
                  "|---|---|---|---|---|---|"]
        for task, metrics in bench.items():
            for m, row in metrics.items():
                lines.append(f"| {task} | {m} | {_f(row.get('teacher'))} | {_f(row.get('student_initial'))} | "
                             f"{_f(row.get('student'))} | {_f(row.get('retention'))} |")
        for task, why in (rep.get("benchmarks_unavailable") or {}).items():
            lines.append(f"| {task} | – | not measured: {why} | | | |")
        lines.append("")
    cap = rep.get("capabilities")
    if cap:
        lines += [f"## Capabilities (retention floor {cap['floor']})", "", "| | what | retention | |", "|---|---|---|---|"]
        for g in cap["groups"]:
            lines.append(f"| group **{g['name']}** | {', '.join(g['tasks'])} | {_f(g['retention'])} | "
                         f"{'**below floor**' if g['below_floor'] else 'ok'} |")
        for t in cap["tasks"]:
            lines.append(f"| {t['source']} {t['name']} | {t['metric']} | {_f(t['retention'])} | "
                         f"{'**below floor**' if t['below_floor'] else 'ok'} |")
        lines.append("")
    c = rep.get("contamination")
    if c:
        lines += ["## Contamination", "",
                  f"{c['exact']} exact and {c['near_duplicate']} near-duplicate (word 3-gram Jaccard ≥ {c['threshold']}) "
                  f"of {c['held_out']} held-out prompts among the training prompts."
                  + (" **The held-out figures overstate generalisation.**" if c["exact"] or c["near_duplicate"] else ""),
                  ""]
        for ex in c.get("examples") or []:
            lines.append(f"- held-out `{ex['id']}` ~ training `{ex['train_id']}` ({ex['kind']}, {ex['similarity']})")
        if c.get("examples"):
            lines.append("")
    return lines


def cost_cells(rep: dict, who: str) -> str:
    """`` | cost per 1M tokens`` cell for the report.md cost table (empty without ``report.cost_per_hour``)."""
    cost = rep.get("cost")
    if not cost:
        return ""
    return f" {_f((cost.get(who) or {}).get('cost_per_million_tokens'))} |"


def plot_benchmarks(rep: dict, out_dir) -> list[str]:
    """``benchmarks.png``: each task's main metric for teacher, initial and trained student."""
    bench = rep.get("benchmarks") or {}
    items = [(t, *_primary(m)) for t, m in bench.items()]
    items = [(t, m) for t, m, r in items if m is not None]
    if not items:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(items) + 1.5), 3.4))
    whos = [("teacher", "#4c72b0"), ("student_initial", "#bbbbbb"), ("student", "#dd8452")]
    width = 0.8 / len(whos)
    for k, (who, color) in enumerate(whos):
        vals = [bench[t][m].get(who) for t, m in items]
        if all(v is None for v in vals):
            continue
        ax.bar([i + (k - 1) * width for i in range(len(items))], [v or 0 for v in vals], width, label=who, color=color)
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels([f"{t}\n({m})" for t, m in items], fontsize=8)
    ax.set_title("Benchmarks (lm-evaluation-harness)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "benchmarks.png", dpi=110)
    plt.close(fig)
    return ["benchmarks.png"]
