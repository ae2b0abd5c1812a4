"""Several processes (torchrun, gloo on CPU): the README's `accelerate launch` / torchrun path.

Two processes with one micro-batch each must train exactly like one process accumulating the
same two micro-batches: the loss is normalised by the global token count and DDP's gradient
averaging is undone, so the step, the logged loss and the saved weights agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import base_config, narrow_student

QUIET = {"generate": False, "speed_prompts": 0}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg: dict, path, nproc: int, cpu_flag: bool = True) -> subprocess.CompletedProcess:
    """``torchrun`` on CPUs; ``ACCELERATE_USE_CPU`` is what ``accelerate launch --cpu`` sets."""
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpu_flag:
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), "-m", "kdistill", "run", str(path), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _one_vs_two(tiny, tmp_path, steps: int, **common):
    """The same run as one process accumulating two micro-batches and as two processes; both dirs."""
    one, two = tmp_path / "one", tmp_path / "two"
    cfg1 = base_config(tiny, one, train={"max_steps": steps, "batch_size": 4, "gradient_accumulation_steps": 2},
                       **common)
    cfg2 = base_config(tiny, two, train={"max_steps": steps, "batch_size": 4}, **common)
    for cfg, path, n in ((cfg1, tmp_path / "one.yaml", 1), (cfg2, tmp_path / "two.yaml", 2)):
        r = _launch(cfg, path, n)
        assert r.returncode == 0, r.stderr[-2000:]
    return one, two


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_with_accumulation(tiny, tmp_path):
    from safetensors.torch import load_file

    one, two = _one_vs_two(tiny, tmp_path, 3, eval=QUIET, data={"max_eval_rows": 4})
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    w1, w2 = load_file(one / "student" / "model.safetensors"), load_file(two / "student" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    rep = json.loads((two / "report.json").read_text())
    assert rep["training"]["steps"] == 3 and "retention" in rep


def test_processes_that_accelerate_does_not_join_are_refused(tiny, tmp_path):
    """torchrun on CPUs without --cpu: accelerate would run two separate copies into one folder."""
    r = _launch(base_config(tiny, tmp_path / "o", eval=QUIET), tmp_path / "c.yaml", 2, cpu_flag=False)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.startswith("kdistill: error:")]
    assert lines and "accelerate launch --cpu" in lines[0] and "WORLD_SIZE" in lines[0]
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_on_policy_greedy_two_processes_equal_one(tiny, tmp_path):
    """Student-sampled batches (greedy): each process samples its own micro-batch's prompts."""
    one, two = _one_vs_two(tiny, tmp_path, 2, method="on_policy", eval=QUIET, data={"max_eval_rows": 4},
                           on_policy={"lambda": 1.0, "temperature": 0.0, "max_new_tokens": 5})
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    rows = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows] == [1.0, 1.0]


def test_self_distill_and_zephyr_share_their_stages_across_processes(tiny, tmp_path):
    """Multi-pass methods under two processes: every prompt sampled once (by one process), the
    stage files written once, rounds and stages finished, no part files left behind."""
    sd = tmp_path / "sd"
    cfg = base_config(tiny, sd, method="self_distill", train={"max_steps": 2, "batch_size": 4}, eval=QUIET,
                      data={"max_eval_rows": 4},
                      self_distill={"iterations": 2, "n": 2, "max_new_tokens": 4, "prompts_per_round": 10})
    r = _launch(cfg, tmp_path / "sd.yaml", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    for k in (1, 2):
        rdir = sd / "self_distill" / f"round-{k}"
        lines = (rdir / "candidates.jsonl").read_text().splitlines()
        ids = [json.loads(l)["id"] for l in lines]
        assert len(ids) == len(set(ids)) == 10
        assert (rdir / "done.json").is_file() and (rdir / "student" / "model.safetensors").is_file()
        assert not list(rdir.glob("*.part-*"))
    rep = json.loads((sd / "report.json").read_text())
    assert rep["method_summary"]["candidates_kept_per_round"] == [10, 10]
    assert r.stderr.count("self_distill round 1/2: sampling") == 1  # one process speaks

    z = tmp_path / "z"
    cfg = base_config(tiny, z, method="zephyr", train={"max_steps": 2, "batch_size": 4}, eval=QUIET,
                      data={"max_eval_rows": 4},
                      zephyr={"max_new_tokens": 4, "candidates": 2, "feedback_prompts": 6, "win_rate_prompts": 2,
                              "scorer": "loglik"},
                      dpo={"max_steps": 2})
    r = _launch(cfg, tmp_path / "z.yaml", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    teacher_rows = [json.loads(l)["id"] for l in (z / "zephyr" / "1-sft" / "teacher.jsonl").read_text().splitlines()]
    assert len(teacher_rows) == len(set(teacher_rows)) == 64
    cands = (z / "zephyr" / "2-feedback" / "candidates.jsonl").read_text().splitlines()
    assert len(cands) == 6
    rep = json.loads((z / "report.json").read_text())
    assert rep["method_summary"]["win_rate_vs_dsft"] is not None and (z / "zephyr" / "3-dpo" / "done.json").is_file()


def test_feature_adapters_train_alike_under_two_processes(tiny, tmp_path):
    """Adapters live beside the student (outside its forward): their gradients are still averaged
    across processes, so two processes equal one accumulating."""
    one, two = _one_vs_two(tiny, tmp_path, 3, eval=QUIET, data={"max_eval_rows": 4}, features={"weight": 1.0},
                           student={"model": str(narrow_student(tiny, tmp_path / "narrow")), "init": None})
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    feats = [json.loads(l)["feature_loss"] for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(feats) == 3 and feats[-1] != feats[0]


def test_accumulation_and_resume_under_two_processes(tiny, tmp_path):
    """Two processes x 2 accumulation steps == one process x 4 (DDP no_sync on the first micro-batch);
    and a two-process run stopped at step 2 resumes from its checkpoint to the uninterrupted result."""
    common = dict(eval=QUIET, data={"max_eval_rows": 4})
    one = tmp_path / "one"
    r = _launch(base_config(tiny, one, train={"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 4},
                            **common), tmp_path / "one.yaml", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    two = tmp_path / "two"
    r = _launch(base_config(tiny, two, train={"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 2},
                            **common), tmp_path / "two.yaml", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)

    const = {"batch_size": 4, "lr_scheduler": "constant", "save_every": 1}
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert _launch(base_config(tiny, clean, train={"max_steps": 4, **const}, **common), tmp_path / "c.yaml", 2).returncode == 0
    assert _launch(base_config(tiny, resumed, train={"max_steps": 2, **const}, **common), tmp_path / "r.yaml", 2).returncode == 0
    r = _launch(base_config(tiny, resumed, train={"max_steps": 4, "resume": "accept_changes", **const}, **common),
                tmp_path / "r.yaml", 2)  # a longer run: a changed setting, continued by choice
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((resumed / "report.json").read_text())["training"]["resumed_from"] == 2
    assert _losses(resumed) == pytest.approx(_losses(clean), rel=1e-5)
