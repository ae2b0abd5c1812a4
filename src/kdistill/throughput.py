"""Tokens per second, model FLOPs utilisation, the padding share and where a step's time goes.

Every training step is measured (:class:`StepMeter`, driven by the trainer) and each row of
``metrics.jsonl`` carries:

* ``tokens_per_s``: trained tokens (those the loss averages over) per second of the step;
* ``mfu``: model FLOPs of the step / (step time × peak FLOP/s of the device). Model FLOPs are
  6·N·tokens for the student's update (forward + backward over its real, unpadded tokens), plus
  2·N for every token a *local* teacher reads and every token the student reads or writes while
  sampling (on-policy) — N being the parameters of the model's linear layers (what a token's
  matmuls touch: attention, MLP, output head; not the embedding lookup). Attention's own
  ``O(length²)`` term is left out, as in the usual MFU convention (PaLM, appendix B);
* ``padding``: share of the student's positions in the step's micro-batches that are padding;
* ``sample_s``, ``teacher_s``, ``update_s``: the step's wall time split into preparing batches
  (on-policy: sampling from the student), the teacher's signal, and the rest (the student's
  forward/backward and the optimizer step).

The peak is ``train.peak_tflops`` when given (the datasheet figure of a GPU, per device), otherwise
measured once per machine with a matmul probe and kept in ``<model cache>/peak_flops.json``
(:func:`peak_flops`). A probe on a CPU shared with other jobs reads low; a step that outpaces it
raises the kept peak to that step's rate (:class:`StepMeter`), so MFU never reads above 100%.

Work that runs inside a step and is not the trainer's own (a teacher's forward, sampling) reports
itself to the process-wide :data:`clock` (:meth:`StepClock.section`, :meth:`StepClock.add_flops`).
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdistill.models.load import cache_dir
from kdistill.store import atomic_write


def linear_params(model: nn.Module) -> int:
    """Weights of ``model``'s linear layers (each counted once): the N of ``2·N`` FLOPs per token."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


class StepClock:
    """Exclusive wall time per named section (a nested section's time is not its parent's) and
    FLOPs, accumulated until :meth:`take`."""

    def __init__(self):
        self._stack: list[list] = []
        self.times: dict[str, float] = {}
        self.flops = 0.0

    @contextlib.contextmanager
    def section(self, name: str):
        now = time.perf_counter()
        if self._stack:  # pause the parent
            parent = self._stack[-1]
            self.times[parent[0]] = self.times.get(parent[0], 0.0) + now - parent[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            name_, start = self._stack.pop()
            self.times[name_] = self.times.get(name_, 0.0) + end - start
            if self._stack:
                self._stack[-1][1] = end

    def add_flops(self, flops: float) -> None:
        self.flops += float(flops)

    def take(self) -> tuple[dict, float]:
        """``(times per section, FLOPs)`` since the last call; starts over."""
        out = (self.times, self.flops)
        self.times, self.flops = {}, 0.0
        return out


clock = StepClock()  # one per process: teachers and samplers report into it, the trainer reads it


def _probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best FLOP/s of square matmuls on ``device`` over about ``seconds``."""
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * n**3 / dt)
        if time.perf_counter() > t_end:
            return best


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a peak figure is valid for: host, processor or GPU, threads, dtype, torch version."""
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return (f"{platform.node()}|{device.type}:{what}|threads={torch.get_num_threads()}|{dtype}|"
            f"torch {torch.__version__}")


def _read_peaks(cache: Optional[Path]) -> dict:
    if cache is None or not cache.is_file():
        return {}
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return known if isinstance(known, dict) else {}


def remember_peak(cache: Optional[Path], key: str, flops: float) -> None:
    """Keep ``flops`` as the peak of ``key`` in ``cache`` (best effort: a read-only folder is skipped)."""
    if cache is None:
        return
    known = _read_peaks(cache)
    known[key] = float(flops)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(known, indent=1).encode())
    except OSError:
        pass  # a read-only cache folder: measured again next time


def peak_flops(device: torch.device, dtype: torch.dtype, given_tflops: Optional[float] = None,
               cache: Optional[Path] = None) -> tuple[float, str]:
    """``(peak FLOP/s, where it comes from)``: ``given_tflops`` (config), else a matmul probe measured
    once per :func:`machine_key` and kept in ``cache`` (``peak_flops.json`` in the model cache).
    A kept probe that a run outpaces is raised to that run's fastest step (:class:`StepMeter`)."""
    if given_tflops:
        return given_tflops * 1e12, "train.peak_tflops"
    key = machine_key(device, dtype)
    known = _read_peaks(cache)
    if not isinstance(known.get(key), (int, float)) or known[key] <= 0:
        known[key] = _probe(device, dtype)
        remember_peak(cache, key, known[key])
    return float(known[key]), f"matmul probe ({key.split('|')[1]}, {cache if cache is not None else 'not kept'})"


class StepMeter:
    """Per-step and whole-run throughput figures (see the module docstring)."""

    def __init__(self, student: nn.Module, peak: float, peak_source: str,
                 remember: Optional[Callable[[float], None]] = None):
        """``remember``: given for a probed peak (not ``train.peak_tflops``); a step faster than the
        probe proves the probe read low (it ran on a busy machine): the peak is raised to that step's
        rate from then on, so MFU never reads above 100%, and the new peak is handed to ``remember``
        at :meth:`summary`."""
        self.n_student = linear_params(student)
        self.peak, self.peak_source = peak, peak_source
        self._remember, self.raised = remember, False
        self.total = {"seconds": 0.0, "trained": 0, "real": 0, "positions": 0, "flops": 0.0,
                      "sample_s": 0.0, "teacher_s": 0.0, "update_s": 0.0, "steps": 0}
        self._t0 = 0.0

    def start(self) -> None:
        clock.take()
        self._t0 = time.perf_counter()

    def stop(self, real: int, positions: int, trained: int) -> dict:
        """Figures of the step that started at :meth:`start`: ``real``/``positions`` of the student's
        micro-batches, ``trained`` tokens (the global item count)."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        times, other = clock.take()
        flops = 6.0 * self.n_student * real + other
        sample, teacher = times.get("sample", 0.0), times.get("teacher", 0.0)
        if self._remember is not None and flops / dt > self.peak:
            self.peak, self.raised = flops / dt, True
        row = {"tokens_per_s": round(trained / dt, 2), "mfu": round(flops / (dt * self.peak), 5),
               "padding": round(1 - real / positions, 4) if positions else 0.0,
               "sample_s": round(sample, 3), "teacher_s": round(teacher, 3),
               "update_s": round(max(dt - sample - teacher, 0.0), 3)}
        t = self.total
        for k, v in (("seconds", dt), ("trained", trained), ("real", real), ("positions", positions),
                     ("flops", flops), ("sample_s", sample), ("teacher_s", teacher),
                     ("update_s", max(dt - sample - teacher, 0.0)), ("steps", 1)):
            t[k] += v
        return row

    def summary(self) -> Optional[dict]:
        """The run's figures for the report (steps of this process since the run or its resume);
        None when no step ran here (a rerun of a finished run measures nothing)."""
        t = self.total
        if not t["steps"]:
            return None
        s = max(t["seconds"], 1e-9)
        if self.raised:
            self._remember(self.peak)
            self.raised = False
            self.peak_source += "; raised to this run's fastest step: the probe had read low"
        return {
            "tokens_per_s": round(t["trained"] / s, 2),
            "mfu": round(t["flops"] / (s * self.peak), 5),
            "padding": round(1 - t["real"] / t["positions"], 4) if t["positions"] else 0.0,
            "model_tflops": round(t["flops"] / 1e12, 3),
            "peak_tflops": round(self.peak / 1e12, 4),
            "peak_from": self.peak_source,
            "step_split": {k: round(t[f"{k}_s"] / s, 4) for k in ("sample", "teacher", "update")},
            "measured_steps": t["steps"],
            "student_linear_params": self.n_student,
        }


def cache_file() -> Path:
    """Where the measured peaks are kept: ``peak_flops.json`` in the model cache folder."""
    return cache_dir() / "peak_flops.json"
