"""No compute on padding (issue 17): length-grouped schedules, packed rows equal to plain ones (loss
and gradients, plain and fused paths, live and cached teacher), the padding share, tokens/s and
utilisation in metrics.jsonl and the report."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from conftest import base_config, make_llama
from test_cache import tiny_cache  # noqa: F401  (the session's top-16 cache of the tiny teacher)
from kdistill.batching import (check_packing, grouped_schedule, pack_rows, packing_refusal, padding_counts,
                               row_length)
from kdistill.config import load_config
from kdistill.data import collate, encode_examples, load_examples, renderer_for
from kdistill.methods.base import RunContext
from kdistill.methods.logit import LogitMethod
from kdistill.models import StudentLM, load_model
from kdistill.models.introspect import forward_inputs, packed_positions
from kdistill.run import run
from kdistill.teachers.cache import CachedTeacher
from kdistill.teachers.local import LocalTeacher
from kdistill.throughput import StepClock, StepMeter, linear_params, machine_key, peak_flops, remember_peak
from kdistill.trainer import _epoch_batches


def _features(tiny, n=24):
    cfg = load_config(None, [], base=base_config(tiny, tiny / "unused"))
    _, tok = load_model(str(tiny / "teacher"), with_tokenizer=True)
    feats, _ = encode_examples(renderer_for(cfg, tok), load_examples(tiny / "train.jsonl"))
    rng = random.Random(0)
    for f in feats:  # a spread of lengths: cut some responses short (labels stay valid)
        cut = rng.choice([0, 0, 2, 4])
        if cut and len(f["input_ids"]) - cut > 0 and any(l != -100 for l in f["labels"][: -cut]):
            f["input_ids"], f["labels"] = f["input_ids"][:-cut], f["labels"][:-cut]
    return feats[:n], tok, cfg


# ---------------------------------------------------------------------------------------------
# schedules


def test_length_grouped_schedule_covers_rows_is_seeded_and_pads_less():
    rng = random.Random(1)
    feats = [{"input_ids": [0] * rng.randint(5, 120)} for _ in range(1000)]
    bs = 8
    sched = grouped_schedule(feats, bs, seed=3)
    e0 = sched(0)
    assert len(e0) == len(_epoch_batches(len(feats), bs, 3, 0)) == 125
    assert sorted(r for b in e0 for r in b) == list(range(1000))
    assert grouped_schedule(feats, bs, seed=3)(0) == e0 and sched(1) != e0 and grouped_schedule(feats, bs, 4)(0) != e0

    def pad(batches):
        real = sum(row_length(feats[r]) for b in batches for r in b)
        return 1 - real / sum(len(b) * max(row_length(feats[r]) for r in b) for b in batches)

    assert pad(e0) < 0.1 < 0.35 < pad(_epoch_batches(len(feats), bs, 3, 0))
    widest = max(len(b) * max(row_length(feats[r]) for r in b) for b in e0)
    assert len(e0[0]) * max(row_length(feats[r]) for r in e0[0]) == widest  # out of memory shows at step 1


def test_pack_rows_layout():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "id": "a"},
             {"input_ids": [8, 9], "labels": [-100, 9], "id": "b"},
             {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "id": "c"},
             {"input_ids": [10, 11, 12], "labels": [-100, 11, 12], "id": "d"}]
    one = pack_rows(feats, pad_id=0, attention_cost=0.0)  # a variable-length kernel: no padding at all
    assert padding_counts(one) == (12, 12)
    b = pack_rows(feats, pad_id=0, attention_cost=0.1)  # a dense kernel: two rows of 6 beat one of 12
    assert b["ids"] == ["a", "b", "c", "d"] and b["input_ids"].shape == (2, 6)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 8, 9], [5, 6, 7, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 2, 2, 2]]
    assert b["labels"].tolist() == [[-100, 3, 4, -100, 9, -100], [6, 7, -100, 11, 12, -100]]
    assert b["segments"].tolist() == [[1, 0, 3], [0, 4, 2], [0, 0, 4], [1, 3, 3]]
    assert padding_counts(b) == (12, 12)
    b = pack_rows(feats[:3], pad_id=0, attention_cost=1.0)  # attention dear: one sequence per row
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert packed_positions(torch.tensor([[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]])).tolist() == \
        [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    plain = forward_inputs(b["input_ids"], b["attention_mask"])  # one sequence per row: as it was
    assert plain["attention_mask"] is not None and "position_ids" not in plain


# ---------------------------------------------------------------------------------------------
# packed == plain


def _loss_and_grads(method, wrapper, batch, n):
    wrapper.zero_grad(set_to_none=True)
    loss, _ = method.loss(wrapper, batch, n)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in wrapper.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused,features", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_packed_batch_gives_the_plain_loss_and_gradients(tiny, fused, features):
    feats, tok, _ = _features(tiny)
    V = len(tok)
    teacher, _ = load_model(str(tiny / "teacher"), with_tokenizer=False)
    student = make_llama(V, layers=2, seed=5)
    cfg = load_config(None, [], base=base_config(tiny, tiny / "unused", loss={"fused": fused, "alpha": 0.7},
                                                  features={"weight": features}))
    method = LogitMethod(RunContext(cfg=cfg, tokenizer=tok, teacher=LocalTeacher(teacher, V), vocab_size=V,
                                    output_dir=tiny, student=student))
    wrapper = StudentLM(student, method.trainable_modules())
    plain, packed = collate(feats, tok.pad_token_id), pack_rows(feats, tok.pad_token_id, 1 / 384)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # fewer rows, less padding
    assert padding_counts(packed)[0] == padding_counts(plain)[0]
    assert padding_counts(packed)[1] < padding_counts(plain)[1]
    n = method.num_items(plain)
    assert method.num_items(packed) == n
    la, ga = _loss_and_grads(method, wrapper, plain, n)
    lb, gb = _loss_and_grads(method, wrapper, packed, n)
    assert lb == pytest.approx(la, rel=1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6)


def test_packed_batch_from_the_cache_gives_the_plain_loss(tiny, tiny_cache):  # noqa: F811
    path, _ = tiny_cache
    _, tok = load_model(str(tiny / "teacher"), with_tokenizer=True)
    cfg = load_config(None, [], base=base_config(tiny, tiny / "unused", loss={"alpha": 0.5}))
    feats = encode_examples(renderer_for(cfg, tok), load_examples(tiny / "train.jsonl"))[0][:16]  # rows as cached
    V = len(tok)
    teacher = CachedTeacher(path, V)
    method = LogitMethod(RunContext(cfg=cfg, tokenizer=tok, teacher=teacher, vocab_size=V, output_dir=tiny))
    wrapper = StudentLM(make_llama(V, layers=2, seed=6))
    plain, packed = collate(feats, tok.pad_token_id), pack_rows(feats, tok.pad_token_id, 1 / 384)
    n = method.num_items(plain)
    la, ga = _loss_and_grads(method, wrapper, plain, n)
    lb, gb = _loss_and_grads(method, wrapper, packed, n)
    assert lb == pytest.approx(la, rel=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6)


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention cannot keep packed sequences apart (it drops the positions)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_packing_is_checked_on_the_model_and_refused_with_one_line():
    llama = make_llama(300, layers=2)
    assert check_packing(llama) is None
    why = check_packing(_IgnoresPositions(llama))
    assert why.startswith("train.batching: packed:") and "use length_grouped" in why and "\n" not in why

    class M:  # duck-typed method and teacher
        name, single_pass, packs = "toy", True, True

    class T:
        what, packs, model = "a teacher served over HTTP", False, None

    assert packing_refusal(M(), None, llama) is None
    assert "served over HTTP" in packing_refusal(M(), T(), llama)
    M.single_pass = False
    assert "single-pass" in packing_refusal(M(), None, llama)


# ---------------------------------------------------------------------------------------------
# figures in every run


def test_run_reports_padding_tokens_per_s_and_utilisation(tiny, tmp_path):
    out = tmp_path / "packed"
    cfg = base_config(tiny, out, train={"max_steps": 2, "batching": "packed", "peak_tflops": 0.05},
                      eval={"generate": False, "speed_prompts": 0})
    rep = run(load_config(base=cfg), progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and 0 <= r["padding"] < 0.2
        assert r["update_s"] > 0 and r["sample_s"] >= 0 and r["teacher_s"] > 0
    tp = rep["training"]["throughput"]
    assert tp["peak_from"] == "train.peak_tflops" and tp["peak_tflops"] == 0.05 and tp["measured_steps"] == 2
    assert abs(sum(tp["step_split"].values()) - 1) < 0.01 and rep["training"]["batching"] == "packed"
    md = (out / "report.md").read_text()
    assert "trained tokens/s" in md and "model FLOPs utilisation" in md and "padding" in md
    plain = tmp_path / "shuffle"
    run(load_config(base=base_config(tiny, plain, train={"max_steps": 2, "batching": "shuffle", "peak_tflops": 0.05},
                                     eval={"generate": False, "speed_prompts": 0})), progress=False)
    pad_plain = [json.loads(l)["padding"] for l in (plain / "metrics.jsonl").read_text().splitlines()]
    assert sum(pad_plain) > sum(r["padding"] for r in rows)


def test_step_clock_sections_are_exclusive_and_peak_is_measured_once(tmp_path):
    c = StepClock()
    with c.section("sample"):
        time.sleep(0.02)
        with c.section("teacher"):
            time.sleep(0.03)
    c.add_flops(10)
    times, flops = c.take()
    assert 0.015 < times["sample"] < 0.03 and times["teacher"] >= 0.03 and flops == 10
    assert c.take() == ({}, 0.0)
    cache = tmp_path / "peak.json"
    first, src = peak_flops(torch.device("cpu"), torch.float32, None, cache)
    assert first > 1e8 and "matmul probe" in src and cache.is_file()
    again, _ = peak_flops(torch.device("cpu"), torch.float32, None, cache)
    assert again == first  # read back, not measured again
    assert peak_flops(torch.device("cpu"), torch.float32, 2.0, cache) == (2e12, "train.peak_tflops")
    llama = make_llama(300, layers=2, hidden=64)
    assert linear_params(llama) == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 300 * 64


def test_a_probe_that_read_low_is_raised_to_the_fastest_step_and_kept(tmp_path):
    """A matmul probe taken on a busy machine reads low; a run that outpaces it must not report MFU
    above 100%: the peak becomes the fastest step's rate, and that is what the cache keeps."""
    cache = tmp_path / "peak.json"
    key = machine_key(torch.device("cpu"), torch.float32)
    remember_peak(cache, key, 1.0)  # an absurdly low kept probe: 1 FLOP/s
    peak, src = peak_flops(torch.device("cpu"), torch.float32, None, cache)
    assert peak == 1.0
    model = make_llama(300, layers=2, hidden=64)
    meter = StepMeter(model, peak, src, remember=lambda f: remember_peak(cache, key, f))
    rows = []
    for real in (40, 80):
        meter.start()
        time.sleep(0.01)
        rows.append(meter.stop(real, real, real))
    assert all(0 < r["mfu"] <= 1.0 for r in rows) and rows[0]["mfu"] == 1.0
    summary = meter.summary()
    assert 0 < summary["mfu"] <= 1.0 and "probe had read low" in summary["peak_from"]
    kept = json.loads(cache.read_text())[key]
    assert kept == meter.peak > 1.0
    # a peak given in config is the user's figure: never raised
    fixed = StepMeter(model, 1.0, "train.peak_tflops")
    fixed.start()
    assert fixed.stop(40, 40, 40)["mfu"] > 1.0


def test_on_policy_samples_are_packed_and_the_step_split_names_sampling(tiny, tmp_path):
    out = tmp_path / "op"
    cfg = base_config(tiny, out, method="on_policy", on_policy={"lambda": 1.0, "max_new_tokens": 6},
                      train={"max_steps": 2, "batching": "packed"}, eval={"generate": False, "speed_prompts": 0})
    rep = run(load_config(base=cfg), progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["on_policy"] == 1.0 and r["sample_s"] > 0 and r["teacher_s"] > 0 for r in rows)
    assert all(r["padding"] < 0.25 for r in rows)
    assert rep["training"]["throughput"]["step_split"]["sample"] > 0
