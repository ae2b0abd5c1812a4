"""report.json, report.md and plots from a finished evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from kdistill.evaluate import HIGHER_IS_BETTER, retention
from kdistill.store import atomic_write
from kdistill.trust_report import benchmark_sentence, cost_cells, notes, plot_benchmarks, stop_note
from kdistill.trust_report import markdown as trust_markdown

METRIC_ORDER = ("accuracy", "perplexity", "bits_per_byte", "kl_to_teacher", "top1_agreement")


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
    """One plain sentence: how much of the teacher the student kept (the first line of report.md),
    followed by what qualifies it (training stopped early, contamination; see :mod:`kdistill.trust_report`)."""
    return " ".join([x for x in [_headline(rep) or benchmark_sentence(rep)] if x] + notes(rep))


def _headline(rep: dict) -> str:
    s, t, ret = rep["student"], rep["teacher"], rep["retention"]
    share = f" with {s['params'] / t['params']:.0%} of its parameters" if t.get("params") and s.get("params") else ""
    if ret.get("accuracy") is not None:
        return (f"The student keeps {ret['accuracy']:.0%} of the teacher's held-out accuracy "
                f"({s['metrics']['accuracy']:.1%} vs {t['metrics']['accuracy']:.1%}){share}.")
    if ret.get("perplexity") is not None:
        return f"Perplexity retention {ret['perplexity']:.2f} (teacher/student){share}."
    if ret.get("bits_per_byte") is not None:
        return f"Bits-per-byte retention {ret['bits_per_byte']:.2f} (teacher/student){share}."
    if "accuracy" in s["metrics"]:
        return (f"The student answers {s['metrics']['accuracy']:.1%} of the held-out rows correctly "
                f"(teacher: not measured).")
    return ""


def strict(value):
    """``value`` with every non-finite float (NaN, ±inf) replaced by None: report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_report(rep: dict, out: Path) -> None:
    """``report.json``, ``report.md`` and the plots (their names added to ``report.json``), written
    atomically; ``report.json`` is strict JSON (a non-finite number is written as null)."""
    atomic_write(out / "report.json", json.dumps(strict(rep), indent=2, allow_nan=False))
    atomic_write(out / "report.md", markdown(rep))
    rep["plots"] = plot(rep, out / "metrics.jsonl", out)
    atomic_write(out / "report.json", json.dumps(strict(rep), indent=2, allow_nan=False))


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
    atomic_write(path, markdown(report))


def markdown(report: dict) -> str:
    """``report.md``: the headline, the metrics table, per-task figures, costs, the method, samples."""
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
        lines.append(f"- throughput ({tp['measured_steps']} steps measured in this session): "
                     f"{_fmt(tp['tokens_per_s'])} trained tokens/s, model FLOPs utilisation "
                     f"{tp['mfu']:.2%} of {_fmt(tp['peak_tflops'])} TFLOP/s ({tp['peak_from']}), padding "
                     f"{tp['padding']:.1%} of positions (batching: {tr.get('batching', '?')}); step time: "
                     + ", ".join(f"{k} {v:.0%}" for k, v in sp.items()))
    lines.append(f"- held-out rows: {report.get('eval_rows')}")
    lines += student_lines(report)
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
        per = report.get("cost")
        lines += ["## Cost", "", "| | tokens/s (generation) | peak memory (MB) |" + (
            f" cost per 1M generated tokens (at {per['cost_per_hour']}/hour) |" if per else ""),
            "|---|---|---|" + ("---|" if per else "")]
        for who in ("teacher", "student"):
            lines.append(f"| {who} | {_fmt(sp[who].get('tokens_per_s'))} | {_fmt(sp[who].get('peak_memory_mb'))} |"
                         + cost_cells(report, who))
        lines.append("")
    lines += trust_markdown(report)
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
    return "\n".join(lines)


def student_lines(report: dict) -> list[str]:
    """report.md lines on how the student was built: active / trainable parameters, width, the cut search."""
    s, t = report["student"], report["teacher"]
    lines = []
    for who, d in (("teacher", t), ("student", s)):
        if d.get("params_active") and d.get("params") and d["params_active"] != d["params"]:
            lines.append(f"- {who}: {_fmt(d['params_active'])} active parameters per token of {_fmt(d['params'])}")
    if s.get("trainable_params") is not None and s.get("params") and s["trainable_params"] != s["params"]:
        lines.append(f"- trained parameters: {_fmt(s['trainable_params'])}" + (
            f" (LoRA r={s['lora']['r']}, merged on save: {s['lora']['merge']})" if s.get("lora") else ""))
    init = s.get("init") or {}
    if init.get("width"):
        lines.append("- width kept: " + ", ".join(f"{a} {v['size']} ({v['fraction']:g})" for a, v in init["width"].items()))
    search = init.get("search")
    if search:
        lines += ["", f"Cut search at {_fmt(search['target_params'])} parameters ({search['probe_steps']} probe steps, "
                  f"KL on {search['probe_eval_rows']} held-out training rows):", "",
                  "| candidate | layers | width | params | KL before | KL after |", "|---|---|---|---|---|---|"]
        for i, c in enumerate(search["candidates"]):
            width = ", ".join(f"{a} {f:g}" for a, f in c["width"].items()) or "full"
            mark = " **(kept)**" if i == search["chosen"] else ""
            lines.append(f"| {c['kind']}{mark} | {c['num_layers']} | {width} | {_fmt(c['params'])} | "
                         f"{_fmt(c['kl_before'])} | {_fmt(c['kl_after'])} |")
        lines.append("")
    return lines


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
    return made + plot_benchmarks(report, out_dir)


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
            f"Distilled with {project_link()} from `{t['name']}` (method: `{report.get('method')}`).",
            "",
            *([f"**{stop_note(tr)}**", ""] if stop_note(tr) else []),
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


def project_link() -> str:
    """kdistill and its version, linked to the project's own page when the package metadata names one
    (``[project.urls]``), never to a package index page that is not this project's."""
    from importlib import metadata

    try:
        meta = metadata.metadata("kdistill")
        version = meta.get("Version", "")
        urls = dict(u.split(", ", 1) for u in (meta.get_all("Project-URL") or []) if ", " in u)
    except metadata.PackageNotFoundError:
        version, urls = "", {}
    url = next((urls[k] for k in ("Homepage", "Repository", "Source", "Documentation") if k in urls), None)
    name = f"kdistill {version}".strip()
    return f"[{name}]({url})" if url else name
