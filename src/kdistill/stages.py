"""What a multi-pass method runs its stages with.

A single-pass method just gives the trainer its batches and loss. A multi-pass method
(``on_policy_filter``, ``self_distill``, ``zephyr``, ``dpo``, ``progressive``) overrides
:meth:`Method.fit <kdistill.methods.base.Method.fit>` and gets a :class:`StageRunner` from the run:
it runs the shared trainer on any features, method and output folder (each stage in its own
folder, so each resumes from its own ``checkpoints/``; :func:`kdistill.store.run_stage` skips a
finished one), and evaluates a model on the held-out rows. The run then evaluates the returned
student and writes the usual report, with the method's own figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from accelerate import Accelerator, PartialState
from torch import nn

from kdistill.data import collate
from kdistill.evaluate import logit_metrics
from kdistill.models import StudentLM
from kdistill.store import on_main
from kdistill.trainer import train


@dataclass
class StageRunner:
    cfg: Any  # kdistill.config.Config
    tokenizer: Any
    teacher_model: nn.Module
    vocab_size: int
    device: Any
    eval_rows: list = field(default_factory=list)
    eval_feats: list = field(default_factory=list)
    progress: bool = True
    say: Callable[[str], None] = print

    def train(self, student: nn.Module, method, features: list[dict], output_dir: Path,
              collate_fn: Optional[Callable] = None, tcfg=None):
        """One trainer pass on ``features``; returns ``(trained HF model, TrainResult)``.

        ``tcfg`` (default: the config's ``train`` section) may be a modified copy, e.g. with
        other ``max_steps``. A fresh accelerator per pass keeps each pass's checkpoints its own.
        """
        tcfg = tcfg or self.cfg.train
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        acc = Accelerator(mixed_precision=tcfg.mixed_precision)
        wrapper = StudentLM(student)
        pad = self.tokenizer.pad_token_id
        result = train(wrapper, method, features, collate_fn or (lambda b: collate(b, pad)), tcfg, Path(output_dir),
                       accelerator=acc, progress=self.progress)
        return acc.unwrap_model(wrapper).model, result

    def evaluate(self, model: nn.Module) -> dict:
        """Held-out perplexity, KL to the teacher and top-1 agreement (no generation)."""
        if not self.eval_feats:
            return {}
        m = logit_metrics(model, self.eval_feats, self.tokenizer.pad_token_id, self.vocab_size,
                          teacher=self.teacher_model, batch_size=self.cfg.eval.batch_size, device=self.device)
        return {k: round(v, 6) for k, v in m.items()}


def train_config(tcfg, **changes):
    """A copy of the ``train`` section with some keys changed (None values are ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if "max_steps" in changes:
        changes.setdefault("epochs", None)
    return tcfg.model_copy(update=changes)


def process_seed(seed: int) -> int:
    """``seed`` for process 0, a distinct one for every other process (their own sampling streams)."""
    return seed + 100_003 * PartialState().process_index


def combine_metrics(output_dir: Path, passes: list[tuple[str, Path]]) -> None:
    """``output_dir/metrics.jsonl`` from each pass's own, steps numbered on, each row tagged with
    its ``stage`` (so the report's loss plot covers the whole run)."""
    rows, offset = [], 0
    for name, folder in passes:
        p = Path(folder) / "metrics.jsonl"
        if not p.is_file():
            continue
        part = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
        for r in part:
            rows.append({**r, "step": r["step"] + offset, "stage": name})
        offset += max((r["step"] for r in part), default=0)

    def write():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    on_main(write)
