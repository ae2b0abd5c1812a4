"""``kdistill generate CONFIG``: the teacher (API or local model) answers prompts into a resumable JSONL."""

from __future__ import annotations

from kdistill.answers import generate
from kdistill.config import load_config
from kdistill.console import say


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = generate(cfg, say=say, progress=not args.no_progress)
    return 0 if summary["complete"] else 1
