"""What the benchmarks share: the demo teacher (or a synthetic Llama of similar shape when it is
not installed) and a student cut from it with evenly spaced layers; writing a section of
``docs/benchmarks.md``."""

from __future__ import annotations

import sys
from pathlib import Path


def teacher_and_student(student_layers: int):
    """``(teacher, student, tokenizer, name)``; the student keeps ``student_layers`` evenly spaced layers."""
    from kdistill.models import cut_student, load_model

    try:
        teacher, tok = load_model("demo")
        name = "SmolLM2-135M-Instruct (demo teacher)"
    except Exception as exc:  # noqa: BLE001 - fall back to a synthetic model of similar shape
        print(f"demo teacher unavailable ({exc}); using a synthetic Llama", file=sys.stderr)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_llama, make_tokenizer

        tok = make_tokenizer(400)
        teacher = make_llama(len(tok), layers=12, hidden=256)
        name = "synthetic Llama (12 layers, hidden 256)"
    n = len(teacher.model.layers)
    k = max(1, min(student_layers, n))
    keep = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    return teacher, cut_student(teacher, keep), tok, name


def write_section(path: Path, md: str, heading: str) -> None:
    """Replace the section of ``path`` that starts with the line ``heading`` (up to the next '## '
    heading) by ``md``, or append ``md``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip().startswith(heading)), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + md
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + md.rstrip("\n").splitlines() + [""] + lines[end:]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
