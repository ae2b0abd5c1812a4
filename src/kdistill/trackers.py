"""Experiment trackers users already run (``train.report_to``), through accelerate's trackers.

kdistill writes no logging client of its own: ``train.report_to: tensorboard | wandb | mlflow`` is
handed to ``accelerate.Accelerator(log_with=...)``; the trainer sends every ``metrics.jsonl`` row
(loss, learning rate, gradient norm, ``eval_*`` figures) to it per step, and the run logs the final
held-out figures and retention at the end (``final/*``). TensorBoard event files and MLflow's
local store go under ``OUTPUT/trackers/``; wandb uses its own login and settings (``WANDB_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdistill.errors import ConfigError

_PACKAGES = {"tensorboard": ("tensorboard", "is_tensorboard_available"),
             "wandb": ("wandb", "is_wandb_available"),
             "mlflow": ("mlflow", "is_mlflow_available")}


def accelerator_kwargs(report_to: Optional[str], output_dir: Path) -> dict:
    """``Accelerator`` keyword arguments for ``train.report_to`` (checked: its package is installed)."""
    if report_to is None:
        return {}
    from accelerate import utils

    package, check = _PACKAGES[report_to]
    if not getattr(utils, check)():
        raise ConfigError(f"train.report_to: {report_to} needs the {package} package (pip install {package})")
    return {"log_with": report_to, "project_dir": str(Path(output_dir) / "trackers")}


def _flat(cfg) -> dict:
    """A few run settings as flat scalars (what trackers' hyper-parameter views accept)."""
    t = cfg.train
    return {"method": cfg.method, "teacher": str(cfg.teacher.model or (cfg.teacher.api.model if cfg.teacher.api else "")),
            "learning_rate": t.learning_rate, "batch_size": t.batch_size, "max_steps": t.max_steps or 0,
            "divergence": cfg.loss.divergence, "alpha": cfg.loss.alpha, "temperature": cfg.loss.temperature,
            "seed": t.seed}


def start(acc, cfg) -> None:
    """Open the tracker run (main process; a no-op without ``train.report_to``)."""
    if cfg.train.report_to is not None:
        acc.init_trackers(Path(cfg.output_dir).name or "kdistill", config=_flat(cfg))


def finish(acc, rep: dict) -> None:
    """Log the final held-out figures and retention (``final/...``) and close the tracker run."""
    if not getattr(acc, "trackers", None):
        return
    step = (rep.get("training") or {}).get("steps") or 0
    values = {}
    for who, key in (("teacher", "teacher"), ("student", "student")):
        for m, v in ((rep.get(key) or {}).get("metrics") or {}).items():
            if isinstance(v, (int, float)):
                values[f"final/{who}_{m}"] = v
    for m, v in (rep.get("retention") or {}).items():
        if isinstance(v, (int, float)):
            values[f"final/retention_{m}"] = v
    if values:
        acc.log(values, step=step)
    acc.end_training()
