"""What a command prints for a person: one-line status messages and the end-of-run summary."""

from __future__ import annotations

from pathlib import Path

from kdistill.report import metrics_table


def say(msg: str) -> None:
    """A status line on stderr (stdout stays for results)."""
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold cyan]kdistill[/] {msg}")


def quiet(_msg: str) -> None:
    """``say`` for processes that should not speak (all but the main one)."""


def print_summary(rep: dict, output_dir) -> None:
    """The before/after table, samples and where the files are."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="held-out: teacher vs student", show_lines=False)
    for col in ("metric", "teacher", "student (initial)", "student (trained)", "retention"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for row in metrics_table(rep):
        t.add_row(*row)
    con.print(t)
    sp = rep.get("speed") or {}
    if sp.get("teacher") and sp.get("student"):
        con.print(
            f"generation: teacher {sp['teacher']['tokens_per_s']} tok/s, {sp['teacher']['peak_memory_mb']} MB; "
            f"student {sp['student']['tokens_per_s']} tok/s, {sp['student']['peak_memory_mb']} MB"
        )
    for smp in rep.get("samples", []):
        con.print(f"[dim]prompt:[/] {smp['prompt'].splitlines()[-1]}")
        con.print(f"   reference={smp.get('reference')!r} teacher={smp.get('teacher')!r} "
                  f"initial={smp.get('student_initial')!r} trained={smp.get('student')!r}")
    if rep.get("headline"):
        con.print(f"[bold green]{rep['headline']}[/]")
    out = Path(output_dir)
    con.print(f"files: {out / 'student'}/  {out / 'report.md'}  {out / 'report.json'}  "
              + "  ".join(str(out / p) for p in rep.get("plots", ["loss.png", "metrics.png"])))
