"""engine: vllm — the colocated student sampler and the teacher's offline engine, against a fake vllm.

The default tests run kdistill's vLLM code paths against ``tests/fake_vllm`` (transformers
underneath), which refuses what real vLLM would get wrong silently: generating with dummy weights,
with a stale prefix cache, or while asleep; loading weights the way the CPU backend cannot take
them; and it re-seeds the process as real vLLM does. ``make test-engines`` runs the same paths
against the real vLLM CPU build (``tests/engines/``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.models import cut_at_eos
from kdistill.sampling import sample_completions
from kdistill.answers import generate
from kdistill.methods import build_method
from kdistill.models import StudentLM
from kdistill.run import run
from test_on_policy import context, fast

FAKE = Path(__file__).parent / "fake_vllm"
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


@pytest.fixture()
def fake_vllm(monkeypatch):
    for v in LAUNCH_VARS:  # restored after the test, whatever the sampler sets
        monkeypatch.setenv(v, "x")
        monkeypatch.delenv(v)
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    assert vllm.__version__ == "0.0-fake"
    vllm.ENGINES.clear()
    yield vllm
    sys.modules.pop("vllm", None)


def greedy(student, tok, prompts, n):
    return sample_completions(student, tok, prompts, n, temperature=0.0, batch_size=len(prompts))


def completions(batch, prompts):
    out = []
    for i, p in enumerate(prompts):
        n = int(batch["attention_mask"][i].sum())
        out.append(batch["input_ids"][i, len(p): n].tolist())
    return out


def sgd_step(method, wrapper, batch, lr=0.5):
    loss, _ = method.loss(wrapper, batch, method.num_items(batch))
    loss.backward()
    with torch.no_grad():
        for p in wrapper.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


def same_weights(state: dict, model) -> bool:
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)


@pytest.mark.parametrize("sleep", [False, True])
def test_vllm_samples_come_from_the_current_student(fake_vllm, tiny, tmp_path, sleep):
    ctx, student, tok, renderer, rows, batch = context(tiny, tmp_path, **{"lambda": 1.0, "temperature": 0.0,
                                                                           "max_new_tokens": 6, "engine": "vllm"})
    ctx.cfg.vllm.enable_sleep_mode = sleep
    method = build_method("on_policy", ctx)
    wrapper = StudentLM(student)
    prompts = [renderer.prompt_ids(e) for e in rows]

    out = method.prepare_batch(batch, wrapper)
    (engine,) = fake_vllm.ENGINES
    assert engine.kwargs["load_format"] == "dummy" and engine.kwargs["distributed_executor_backend"] == "external_launcher"
    assert engine.kwargs["max_model_len"] == ctx.cfg.data.max_length
    call = engine.calls[0]
    assert call["prompts"] == prompts  # the rendered prompts, as token ids
    assert call["params"].temperature == 0.0 and call["params"].max_tokens == 6
    assert tok.eos_token_id in call["params"].stop_token_ids
    assert same_weights(call["state"], student)  # generated with the student's weights, not the dummies
    assert completions(out, prompts) == greedy(student, tok, prompts, 6)

    sgd_step(method, wrapper, out)  # the student changes: the next samples must follow it
    before = [e for e in engine.events]
    out2 = method.prepare_batch(batch, wrapper)
    assert same_weights(engine.calls[1]["state"], student)
    assert not all(torch.equal(call["state"][k], engine.calls[1]["state"][k]) for k in call["state"])
    assert completions(out2, prompts) == greedy(student, tok, prompts, 6)
    new = engine.events[len(before):]
    if sleep:
        assert new == ["wake_up:weights", "reload_weights", "reset_prefix_cache", "wake_up:kv_cache", "generate",
                       "sleep2"]
    else:
        assert new == ["reload_weights", "reset_prefix_cache", "generate"]

    method.prepare_batch(batch, wrapper)  # no optimizer step in between: no reload (unless asleep)
    assert engine.events.count("reload_weights") == (3 if sleep else 2) and "apply_model" not in engine.events
    s = method.summary()
    assert s["engine"] == "vllm" and s["engine_generations"] == 3


@pytest.mark.parametrize("drop_stop_token", [False, True])
def test_vllm_ends_and_masks_like_transformers(fake_vllm, tiny, tmp_path, monkeypatch, drop_stop_token):
    """Prompt masked, completion trained, EOS kept (even when the engine leaves it out of token_ids)."""
    monkeypatch.setattr(fake_vllm.LLM, "drop_stop_token", drop_stop_token)
    ctx, student, tok, renderer, rows, batch = context(tiny, tmp_path, **{"lambda": 1.0, "temperature": 0.0,
                                                                           "max_new_tokens": 8, "engine": "vllm"})
    prompts = [renderer.prompt_ids(e) for e in rows]
    stop = greedy(student, tok, prompts[:1], 8)[0][1]
    student.generation_config.eos_token_id = [tok.eos_token_id, stop]  # a token it emits becomes an EOS
    eos = {tok.eos_token_id, stop}
    method = build_method("on_policy", ctx)
    out = method.prepare_batch(batch, StudentLM(student))
    got = completions(out, prompts)
    assert got == [cut_at_eos(c, eos) for c in greedy(student, tok, prompts, 8)]
    assert got[0][-1] == stop and len(got[0]) == 2
    for i, (p, c) in enumerate(zip(prompts, got)):
        assert out["input_ids"][i, : len(p)].tolist() == p
        lab = out["labels"][i].tolist()
        assert set(lab[: len(p) - 1]) == {-100} and lab[len(p) - 1: len(p) - 1 + len(c)] == c
        assert set(lab[len(p) - 1 + len(c):]) <= {-100}
    assert method.summary()["completions_ending_with_eos"] > 0


def test_on_policy_run_with_vllm_reloads_every_step(fake_vllm, tiny, tmp_path):
    out = tmp_path / "run"
    cfg = fast(tiny, out, method="on_policy", on_policy={"lambda": 1.0, "max_new_tokens": 5, "engine": "vllm"},
               train={"max_steps": 3, "gradient_accumulation_steps": 2, "batch_size": 4})
    rep = run(load_config(base=cfg), progress=False)
    s = rep["method_summary"]
    assert s["on_policy_fraction"] == 1.0 and s["engine_generations"] == 6
    assert s["engine_weight_loads"] == 3  # once per optimizer step, not per micro-batch
    (engine,) = fake_vllm.ENGINES
    assert [c["version"] for c in engine.calls] == [1, 1, 2, 2, 3, 3]
    assert (out / "vllm_student" / "config.json").is_file() and not list((out / "vllm_student").glob("*.safetensors"))
    assert (out / "student" / "model.safetensors").is_file() and "retention" in rep


def test_self_distill_rounds_sample_through_vllm(fake_vllm, tiny, tmp_path):
    out = tmp_path / "sd"
    cfg = fast(tiny, out, method="self_distill", train={"max_steps": 2},
               self_distill={"iterations": 2, "n": 2, "max_new_tokens": 4, "prompts_per_round": 4, "engine": "vllm"})
    rep = run(load_config(base=cfg), progress=False)
    (engine,) = fake_vllm.ENGINES
    assert rep["method_summary"]["engine_weight_loads"] == 2  # once per round
    assert all(c["params"].n == 2 for c in engine.calls)
    # round 2 sampled from the round-1 student, whose weights are saved in round-1/student
    from safetensors.torch import load_file

    saved = load_file(str(out / "self_distill" / "round-1" / "student" / "model.safetensors"))
    last = engine.calls[-1]["state"]
    assert all(torch.equal(saved[k], last[k]) for k in saved if k in last)
    cands = [json.loads(l) for l in (out / "self_distill" / "round-2" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 4 and all(len(r["candidates"]) == 2 for r in cands)


def test_teacher_engine_vllm_generates(fake_vllm, tiny, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is the first name alpha {w}"} for w in ("beta", "gamma")])
    cfg = load_config(base={"output_dir": str(tmp_path / "out"), "teacher": {"model": str(tiny / "teacher"), "engine": "vllm"},
                            "vllm": {"gpu_memory_utilization": 0.5},
                            "generate": {"prompts": str(prompts), "max_new_tokens": 4, "temperature": 0.0}})
    s = generate(cfg, progress=False)
    assert s["succeeded"] + s["failed"] == 2
    (engine,) = fake_vllm.ENGINES
    assert engine.kwargs["gpu_memory_utilization"] == 0.5 and engine.kwargs["load_format"] == "auto"
    rows = [json.loads(l) for l in (tmp_path / "out" / "teacher.jsonl").read_text().splitlines()]
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)


def test_missing_vllm_is_one_line_before_training(tiny, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setitem(sys.modules, "vllm", None)  # "import vllm" raises ImportError
    cfg = fast(tiny, tmp_path / "o", method="on_policy", on_policy={"lambda": 0.5, "engine": "vllm"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["run", str(path), "--no-progress"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("kdistill: error:")]
    assert rc == 2 and len(lines) == 1
    assert "on_policy.engine: vllm is not installed" in lines[0]
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_zephyr_feedback_candidates_sample_through_vllm(fake_vllm, tiny, tmp_path):
    out = tmp_path / "z"
    cfg = fast(tiny, out, method="zephyr", train={"max_steps": 2, "batch_size": 8},
               zephyr={"max_new_tokens": 4, "candidates": 2, "feedback_prompts": 4, "win_rate_prompts": 2,
                       "engine": "vllm", "scorer": "loglik"},
               dpo={"max_steps": 1})
    rep = run(load_config(base=cfg), progress=False)
    (engine,) = fake_vllm.ENGINES
    assert rep["method_summary"]["engine_weight_loads"] == 1 and all(c["params"].n == 2 for c in engine.calls)
    from safetensors.torch import load_file

    sft = load_file(str(out / "zephyr" / "1-sft" / "student" / "model.safetensors"))  # candidates: the dSFT student
    assert all(torch.equal(sft[k], engine.calls[0]["state"][k]) for k in sft if k in engine.calls[0]["state"])
    rows = [json.loads(l) for l in (out / "zephyr" / "2-feedback" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["candidates"]) == 2 for r in rows)


# -- weight sync paths, random state, dtype (issue 15) -----------------------------------------------


def _one_student_batch(ctx, student, batch):
    method = build_method("on_policy", ctx)
    out = method.prepare_batch(batch, StudentLM(student))
    return method, out


@pytest.mark.parametrize("has_reload, repacks, works", [(False, False, True), (False, True, False)])
def test_weight_sync_falls_back_or_fails_in_one_line(fake_vllm, tiny, tmp_path, monkeypatch, has_reload, repacks, works):
    """An older engine without reload_weights loads through load_weights; one that takes neither
    (its weights repacked after loading, as vLLM's CPU backend does) stops with one line."""
    monkeypatch.setattr(fake_vllm.LLM, "has_reload", has_reload)
    monkeypatch.setattr(fake_vllm.LLM, "repacks", repacks)
    ctx, student, tok, renderer, rows, batch = context(tiny, tmp_path, **{"lambda": 1.0, "temperature": 0.0,
                                                                           "max_new_tokens": 4, "engine": "vllm"})
    if works:
        method, out = _one_student_batch(ctx, student, batch)
        prompts = [renderer.prompt_ids(e) for e in rows]
        assert completions(out, prompts) == greedy(student, tok, prompts, 4)
        assert method.summary()["engine_weight_sync"] == "load_weights"
        return
    from kdistill.vllm_engine import EngineError

    with pytest.raises(EngineError) as e:
        _one_student_batch(ctx, student, batch)
    msg = str(e.value)
    assert "\n" not in msg and "engine: vllm (vLLM 0.0-fake)" in msg and "weight_loader" in msg


def test_weight_sync_failure_is_one_line_from_the_cli(fake_vllm, tiny, tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setattr(fake_vllm.LLM, "has_reload", False)
    cfg = fast(tiny, tmp_path / "o", method="on_policy", train={"max_steps": 1},
               on_policy={"lambda": 1.0, "max_new_tokens": 3, "engine": "vllm"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["run", str(tmp_path / "c.yaml"), "--no-progress"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("kdistill: error:")]
    assert rc == 2 and len(err) == 1 and "on_policy.engine: engine: vllm (vLLM 0.0-fake)" in err[0]


def test_engine_calls_keep_the_process_random_state_and_threads(fake_vllm, tiny, tmp_path):
    """vLLM re-seeds the process and sets one thread when it starts, and samples from the global
    generator: none of that reaches the training process."""
    import random

    import numpy as np

    ctx, student, tok, renderer, rows, batch = context(tiny, tmp_path, **{"lambda": 1.0, "temperature": 1.0,
                                                                           "max_new_tokens": 4, "engine": "vllm"})
    threads = torch.get_num_threads()

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    want = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    _one_student_batch(ctx, student, batch)  # starts the engine, loads weights, samples at temperature 1
    assert fake_vllm.ENGINES and fake_vllm.ENGINES[0].calls  # the engine really ran
    assert draws() == want and torch.get_num_threads() == threads


def _schedule(out):
    return [json.loads(l)["on_policy"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_schedule_is_the_same_with_either_engine_and_across_a_resume(fake_vllm, tiny, tmp_path, monkeypatch):
    """lambda 0.5 at temperature 1: which batches are sampled from the student depends on the seed
    and the batch, not on the engine (which re-seeds the process) nor on a crash and resume."""
    from conftest import Crash, crash_at_loss

    common = dict(method="on_policy", train={"max_steps": 8, "batch_size": 4, "save_every": 2},
                  on_policy={"lambda": 0.5, "temperature": 1.0, "max_new_tokens": 3})
    run(load_config(base=fast(tiny, tmp_path / "hf", **common)), progress=False)  # engine: transformers
    want = _schedule(tmp_path / "hf")
    assert 0.0 in want and 1.0 in want

    cfg = fast(tiny, tmp_path / "resumed", **{**common, "on_policy": {**common["on_policy"], "engine": "vllm"}})
    crash_at_loss(monkeypatch, 5)
    with pytest.raises(Crash):
        run(load_config(base=cfg), progress=False)
    monkeypatch.undo()
    for v in LAUNCH_VARS:  # as after a restart
        monkeypatch.delenv(v, raising=False)
    rep = run(load_config(base=cfg), progress=False)
    assert rep["training"]["resumed_from"] == 4
    assert _schedule(tmp_path / "resumed") == want
    # after the resume the engine sampled exactly the student batches of steps 5-8
    assert rep["method_summary"]["engine_generations"] == want[4:].count(1.0)


@pytest.mark.parametrize("asked, mixed, engine_dtype, note", [
    ("auto", "no", "float32", False), ("bfloat16", "no", "bfloat16", True), ("auto", "bf16", "bfloat16", False),
    ("float32", "no", "float32", False)])
def test_engine_dtype_follows_the_student(tiny, asked, mixed, engine_dtype, note):
    from kdistill.config import VllmConfig
    from kdistill.models import load_model
    from kdistill.vllm_engine import engine_dtype as pick

    student, _ = load_model(str(tiny / "student"))
    got, why = pick(VllmConfig(dtype=asked), student, mixed)
    assert got == engine_dtype and (why is not None) == note
    if note:
        assert "approximately on-policy" in why and "float32" in why


def test_a_float32_student_samples_from_a_float32_engine_unless_asked(fake_vllm, tiny, tmp_path):
    out = tmp_path / "run"
    cfg = fast(tiny, out, method="on_policy", train={"max_steps": 1},
               on_policy={"lambda": 1.0, "max_new_tokens": 3, "engine": "vllm"})
    rep = run(load_config(base=cfg), progress=False)
    assert fake_vllm.ENGINES[-1].kwargs["dtype"] == "float32"
    s = rep["method_summary"]
    assert s["engine_dtype"] == "float32" and "engine_dtype_note" not in s and s["engine_weight_sync"] == "reload_weights"
    cfg = fast(tiny, tmp_path / "bf16", method="on_policy", train={"max_steps": 1}, vllm={"dtype": "bfloat16"},
               on_policy={"lambda": 1.0, "max_new_tokens": 3, "engine": "vllm"})
    rep = run(load_config(base=cfg), progress=False)
    assert fake_vllm.ENGINES[-1].kwargs["dtype"] == "bfloat16"
    saved = json.loads((tmp_path / "bf16" / "report.json").read_text())["method_summary"]
    assert saved["engine_dtype"] == "bfloat16" and "approximately on-policy" in saved["engine_dtype_note"]
