"""report.json, report.md and plots from a finished evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from kdistill.evaluate import HIGHER_IS_BETTER, retention

METRIC_ORDER = ("accuracy", "perplexity", "kl_to_teacher", "top1_agreement")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def task_table(teacher_ev: dict, initial_ev: Optional[dict], final_ev: dict) -> dict:
    """Per task: teacher, initial and trained student metrics, and retention (from ``by_task`` results)."""
    t_tasks = teacher_ev.get("tasks") or {}
    i_tasks = (initial_ev or {}).get("tasks") or {}
    return {
        name: {"teacher": t_tasks.get(name, {}), **({"student_initial": i_tasks.get(name, {})} if initial_ev else {}),
               "student": metrics, "retention": retention(metrics, t_tasks.get(name, {}))}
        for name, metrics in (final_ev.get("tasks") or {}).items()
    }


def build_report(method: str, teacher: dict, student: dict, teacher_ev: dict, initial_ev: Optional[dict],
                 final_ev: dict, eval_rows: list, show_samples: int, speed: dict, training: Optional[dict] = None,
                 method_summary: Optional[dict] = None, unavailable: Optional[dict] = None) -> dict:
    """The report every method ends with (``report.json``; ``report.md`` is written from it).

    ``teacher``: ``{"name", "params", "kind"}`` (kind: local, api, cache or none); ``student``:
    ``{"name", "params", "teacher_layers"}``; ``*_ev``: ``{"metrics", "outputs", "tasks"?}`` from
    :func:`kdistill.evaluate.by_task` (``initial_ev`` None for ``kdistill eval``). ``unavailable``:
    ``{metric: why}`` for what could not be measured; such a metric's retention is None (not measured),
    never a number computed from half the figures.
    """
    unavailable = dict(unavailable or {})
    rep: dict = {
        "method": method,
        "teacher": {**teacher, "metrics": teacher_ev["metrics"]},
        "student": {**student, "metrics": final_ev["metrics"]},
        "eval_rows": len(eval_rows),
    }
    if initial_ev is not None:
        rep["student_initial"] = {"params": student.get("params"), "metrics": initial_ev["metrics"]}
    ret = retention(final_ev["metrics"], teacher_ev["metrics"])
    for k in unavailable:
        if k in METRIC_ORDER:
            ret[k] = None
    rep["retention"] = ret
    if final_ev.get("tasks"):
        rep["tasks"] = task_table(teacher_ev, initial_ev, final_ev)
    rep["unavailable"] = unavailable
    rep["speed"] = speed
    if training:
        rep["training"] = training
    if method_summary:
        rep["method_summary"] = method_summary
    with_ref = [e for e in eval_rows if e.reference is not None]  # outputs follow the rows with a reference
    samples = []
    for i, e in enumerate(with_ref[:show_samples]):
        smp = {"id": e.id, "prompt": e.prompt, "reference": e.reference}
        for key, ev in (("teacher", teacher_ev), ("student_initial", initial_ev), ("student", final_ev)):
            if ev is not None and i < len(ev.get("outputs") or []):
                smp[key] = ev["outputs"][i]
        samples.append(smp)
    rep["samples"] = samples
    rep["headline"] = headline(rep)
    return rep


def headline(rep: dict) -> str:
    """One plain sentence: how much of the teacher the student kept (the first line of report.md)."""
    s, t, ret = rep["student"], rep["teacher"], rep["retention"]
    share = f" with {s['params'] / t['params']:.0%} of its parameters" if t.get("params") and s.get("params") else ""
    if ret.get("accuracy") is not None:
        return (f"The student keeps {ret['accuracy']:.0%} of the teacher's held-out accuracy "
                f"({s['metrics']['accuracy']:.1%} vs {t['metrics']['accuracy']:.1%}){share}.")
    if ret.get("perplexity") is not None:
        return f"Perplexity retention {ret['perplexity']:.2f} (teacher/student){share}."
    if "accuracy" in s["metrics"]:
        return (f"The student answers {s['metrics']['accuracy']:.1%} of the held-out rows correctly "
                f"(teacher: not measured).")
    return ""


def write_report(rep: dict, out: Path) -> None:
    """``report.json``, ``report.md`` and the plots (their names added to ``report.json``)."""
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    write_markdown(rep, out / "report.md")
    rep["plots"] = plot(rep, out / "metrics.jsonl", out)
    (out / "report.json").write_text(json.dumps(rep, indent=2))


def metrics_table(report: dict) -> list[list[str]]:
    """Rows: metric, teacher, student (initial), student (trained), retention."""
    rows = []
    keys = [k for k in METRIC_ORDER if k in report["student"]["metrics"]]
    for k in keys:
        arrow = "↑" if HIGHER_IS_BETTER.get(k, True) else "↓"
        rows.append(
            [
                f"{k} {arrow}",
                _fmt(report["teacher"]["metrics"].get(k)),
                _fmt(report.get("student_initial", {}).get("metrics", {}).get(k)),
                _fmt(report["student"]["metrics"].get(k)),
                _fmt(report["retention"].get(k)),
            ]
        )
    return rows


def write_markdown(report: dict, path: Path) -> None:
    t, s = report["teacher"], report["student"]
    lines = [f"# kdistill report: {report.get('method', '')}", ""]
    head = report.get("headline")
    if head:
        lines += [f"**{head}**", ""]
    lines += [
        f"- teacher: `{t['name']}` ({_fmt(t['params'])} parameters)",
        f"- student: `{s['name']}` ({_fmt(s['params'])} parameters"
        + (f", {s['params'] / t['params']:.0%} of the teacher)" if t.get("params") else ")"),
    ]
    tr = report.get("training")
    if tr:
        lines.append(
            f"- training: {tr['steps']} steps on {tr['train_rows']} rows in {tr['seconds']:.0f} s"
            + (f" (resumed from step {tr['resumed_from']})" if tr.get("resumed_from") else "")
            + (f"; {tr['truncated_rows']} rows truncated to data.max_length" if tr.get("truncated_rows") else "")
        )
    tp = (tr or {}).get("throughput")
    if tp:
        sp = tp.get("step_split") or {}
        lines.append(f"- throughput: {_fmt(tp['tokens_per_s'])} trained tokens/s, model FLOPs utilisation "
                     f"{tp['mfu']:.2%} of {_fmt(tp['peak_tflops'])} TFLOP/s ({tp['peak_from']}), padding "
                     f"{tp['padding']:.1%} of positions (batching: {tr.get('batching', '?')}); step time: "
                     + ", ".join(f"{k} {v:.0%}" for k, v in sp.items()))
    lines.append(f"- held-out rows: {report.get('eval_rows')}")
    lines += ["", "| metric | teacher | student (initial) | student (trained) | retention |", "|---|---|---|---|---|"]
    for row in metrics_table(report):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Retention = student / teacher, oriented so 1.0 means parity (see `kdistill.evaluate`).", ""]
    tasks = report.get("tasks") or {}
    if tasks:
        keys = [k for k in METRIC_ORDER if any(k in v["student"] for v in tasks.values())]
        lines += ["## Per task", "", "| task | metric | teacher | student (initial) | student (trained) | retention |",
                  "|---|---|---|---|---|---|"]
        for name, v in tasks.items():
            for k in keys:
                lines.append(f"| {name} | {k} | {_fmt(v['teacher'].get(k))} | "
                             f"{_fmt((v.get('student_initial') or {}).get(k))} | {_fmt(v['student'].get(k))} | "
                             f"{_fmt(v['retention'].get(k))} |")
        mix = report.get("data_mixture") or {}
        if mix:
            lines.append("")
            lines.append("Training rows per task: " + ", ".join(
                f"{n} {s.get('used', s.get('rows'))}" + (f" of {s['rows']}" if "used" in s else "") for n, s in mix.items()))
        lines.append("")
    for k, why in (report.get("unavailable") or {}).items():  # e.g. an API teacher has no token probabilities
        lines.append(f"- {k}: not measured ({why})")
    if report.get("unavailable"):
        lines.append("")
    sp = report.get("speed") or {}
    if sp.get("teacher") and sp.get("student"):
        lines += ["## Cost", "", "| | tokens/s (generation) | peak memory (MB) |", "|---|---|---|"]
        for who in ("teacher", "student"):
            lines.append(f"| {who} | {_fmt(sp[who].get('tokens_per_s'))} | {_fmt(sp[who].get('peak_memory_mb'))} |")
        lines.append("")
    extra = report.get("method_summary")
    if extra:
        lines += ["## Method", "", "```json", json.dumps(extra, indent=2), "```", ""]
    samples = report.get("samples") or []
    if samples:
        lines += ["## Samples", ""]
        for smp in samples:
            lines.append(f"- **prompt**: {smp['prompt']}")
            for k in ("reference", "teacher", "student_initial", "student"):
                if smp.get(k) is not None:
                    lines.append(f"  - {k}: {smp[k]!r}")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(report: dict, metrics_path: Optional[Path], out_dir: Path) -> list[str]:
    """``loss.png`` (training loss) and ``metrics.png`` (teacher vs student bars). Returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if metrics_path is not None and metrics_path.exists():
        rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
        if rows:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.set_title("Training loss")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out_dir / "loss.png", dpi=110)
            plt.close(fig)
            made.append("loss.png")
    keys = [k for k in METRIC_ORDER if k in report["student"]["metrics"]]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
        axes = [axes] if len(keys) == 1 else list(axes)
        for ax, k in zip(axes, keys):
            names, vals = [], []
            for who, label in (("teacher", "teacher"), ("student_initial", "initial"), ("student", "trained")):
                v = report.get(who, {}).get("metrics", {}).get(k)
                if v is not None:
                    names.append(label)
                    vals.append(v)
            ax.bar(names, vals, color=["#4c72b0", "#bbbbbb", "#dd8452"][: len(vals)])
            if k == "perplexity":
                ax.set_yscale("log")
            ax.set_title(k + (" ↑" if HIGHER_IS_BETTER.get(k, True) else " ↓"))
        fig.suptitle("Teacher vs student (held-out)")
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=110)
        plt.close(fig)
        made.append("metrics.png")
    return made


def model_card(report: dict, cfg_dump: str) -> str:
    t, s = report["teacher"], report["student"]
    tr = report.get("training") or {}
    ret = ", ".join(f"{k} {v:.2f}" for k, v in report["retention"].items() if v is not None)
    layers = s.get("teacher_layers")
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [kdistill, distillation]",
            "---",
            f"# {s['name']}",
            "",
            f"Distilled with [kdistill](https://pypi.org/project/kdistill/) from `{t['name']}` "
            f"(method: `{report.get('method')}`).",
            "",
            f"- parameters: {s['params']:,}" + (f" ({s['params'] / t['params']:.0%} of the teacher's {t['params']:,})"
                                                if t.get("params") else ""),
            *( [f"- kept teacher layers: {layers}"] if layers else [] ),
            f"- training data: {tr.get('train_rows', '?')} rows, {tr.get('steps', '?')} optimizer steps",
            f"- held-out retention (student/teacher, 1.0 = parity): {ret or 'n/a'}",
            "",
            "## Config",
            "",
            "```yaml",
            cfg_dump.strip(),
            "```",
            "",
        ]
    )
