"""End to end on tiny models: training lowers held-out KL, resume, saved student, kdistill eval."""

import json
import math

import pytest
import torch
import yaml

from conftest import Crash, base_config, crash_at_loss
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.run import run


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_lowers_kl_and_writes_everything(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = base_config(tiny, out, train={"max_steps": 12})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["student"]["metrics"]["kl_to_teacher"] < 0.9 * rep["student_initial"]["metrics"]["kl_to_teacher"]
    assert rep["student"]["metrics"]["top1_agreement"] > rep["student_initial"]["metrics"]["top1_agreement"]
    for key in ("teacher", "student_initial", "student"):
        assert rep[key]["params"] > 0
        assert {"perplexity", "kl_to_teacher", "top1_agreement", "accuracy"} <= set(rep[key]["metrics"])
    assert set(rep["retention"]) >= {"perplexity", "kl_to_teacher", "top1_agreement"}
    assert rep["speed"]["teacher"]["tokens_per_s"] > 0 and rep["speed"]["student"]["peak_memory_mb"] > 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all({"step", "loss", "learning_rate"} <= set(r) for r in rows)
    for f in ("student/model.safetensors", "student/config.json", "student/tokenizer.json", "student/README.md",
              "config.yaml", "report.md", "loss.png", "metrics.png"):
        assert (out / f).exists(), f
    card = (out / "student" / "README.md").read_text()
    assert "teacher" in card and "logit" in card and "12 optimizer steps" in card
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 12 and resolved["loss"]["temperature"] == 1.0
    assert "retention" in (out / "report.md").read_text().lower()


def test_saved_student_reloads_with_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    cfg = load_config(base=base_config(tiny, out, train={"max_steps": 2}, eval={"generate": False, "speed_prompts": 0}))
    run(cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2
    assert model.config.kdistill_teacher_layers == [0, 1]
    ids = tok("alpha beta", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)


def test_resume_after_crash_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    """Crash at step 5 (checkpoint at 3), rerun: continues at step 4 and ends where a clean run ends."""

    quiet = {"generate": False, "speed_prompts": 0}
    clean = tmp_path / "clean"
    run(load_config(base=base_config(tiny, clean, train={"max_steps": 6, "save_every": 3}, eval=quiet)), progress=False)

    crashed = tmp_path / "crashed"
    cfg = load_config(base=base_config(tiny, crashed, train={"max_steps": 6, "save_every": 3}, eval=quiet))
    crash_at_loss(monkeypatch, 5)
    with pytest.raises(Crash):
        run(cfg, progress=False)
    assert [r["step"] for r in _metrics(crashed)] == [1, 2, 3, 4]
    monkeypatch.undo()
    rep = run(cfg, progress=False)
    assert rep["training"]["resumed_from"] == 3
    a, b = _metrics(clean), _metrics(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    wa, wb = load_file(clean / "student" / "model.safetensors"), load_file(crashed / "student" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_matches_big_batch(tiny, tmp_path):
    """batch 8 x 1 step == batch 4 x 2 accumulation (loss normalised by the global token count)."""
    quiet = {"generate": False, "speed_prompts": 0}
    a = tmp_path / "a"
    b = tmp_path / "b"
    plain = {"max_grad_norm": None, "batching": "shuffle"}  # the test splits the plain shuffle's batches
    run(load_config(base=base_config(tiny, a, train={"max_steps": 1, "batch_size": 8, **plain}, eval=quiet)), progress=False)

    from kdistill import trainer as tr

    orig = tr._epoch_batches.__wrapped__

    def halves(n_rows, batch_size, seed, epoch):  # same rows as one batch of 8, split into 4 + 4
        return [h for b8 in orig(n_rows, 8, seed, epoch) for h in (b8[:4], b8[4:])]

    tr._epoch_batches.cache_clear()
    old = tr._epoch_batches
    tr._epoch_batches = halves
    try:
        run(load_config(base=base_config(tiny, b, train={"max_steps": 1, "batch_size": 4, "gradient_accumulation_steps": 2,
                                                          **plain}, eval=quiet)), progress=False)
    finally:
        tr._epoch_batches = old
    la, lb = _metrics(a)[0]["loss"], _metrics(b)[0]["loss"]
    assert lb == pytest.approx(la, rel=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_importance_selection_recorded(tiny, tmp_path):
    out = tmp_path / "imp"
    base = base_config(tiny, out, train={"max_steps": 1}, eval={"generate": False, "speed_prompts": 0})
    base["student"]["init"] = {"from_teacher": True, "num_layers": 2, "layer_selection": "importance", "importance_samples": 8}
    rep = run(load_config(base=base), progress=False)
    chosen = json.loads((out / "student_layers.json").read_text())
    scores = chosen["importance"]
    assert len(scores) == 4 and all(s >= 0 for s in scores)
    expected = sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
    assert chosen["layers"] == expected == rep["student"]["teacher_layers"]
    cfg = json.loads((out / "student" / "config.json").read_text())
    assert cfg["kdistill_teacher_layers"] == expected
    assert str(expected) in (out / "student" / "README.md").read_text()


def test_eval_command_reports_without_training(tiny, tmp_path, capsys):
    out = tmp_path / "ev"
    cfg = base_config(tiny, out)
    cfg["student"] = {"model": str(tiny / "student")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher"]["metrics"]["kl_to_teacher"] == 0.0
    assert rep["student"]["metrics"]["kl_to_teacher"] > 0
    assert "student_initial" not in rep and not (out / "checkpoints").exists()
    assert (out / "report.md").exists() and (out / "metrics.png").exists()


def test_logit_metrics_chunked_equals_whole(tiny):
    """Held-out metrics project response positions a chunk at a time; the chunk size changes nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.data import Renderer, encode_examples, load_examples
    from kdistill.evaluate import logit_metrics

    tok = AutoTokenizer.from_pretrained(tiny / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tiny / "student")
    feats, _ = encode_examples(Renderer(tok, 64), load_examples(tiny / "eval.jsonl"))
    whole = logit_metrics(student, feats, tok.pad_token_id, len(tok), teacher=teacher, chunk_tokens=10**6)
    small = logit_metrics(student, feats, tok.pad_token_id, len(tok), teacher=teacher, chunk_tokens=3)
    assert whole["kl_to_teacher"] > 0 and 0 <= whole["top1_agreement"] <= 1
    for k in whole:
        assert small[k] == pytest.approx(whole[k], rel=1e-5)


@pytest.mark.parametrize("method", ["logit", "on_policy"])
def test_bf16_mixed_precision_runs(tiny, tmp_path, method):
    """train.mixed_precision: bf16 (CPU autocast here; a fresh process, as accelerate's precision is
    fixed per process): the student trains, losses stay finite, the saved weights stay float32."""
    import subprocess
    import sys

    import yaml

    out = tmp_path / method
    cfg = base_config(tiny, out, method=method, train={"max_steps": 3, "mixed_precision": "bf16"},
                      eval={"generate": False, "speed_prompts": 0}, data={"max_eval_rows": 4},
                      on_policy={"lambda": 0.5, "max_new_tokens": 4})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "kdistill", "run", str(tmp_path / "c.yaml"), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert rep["student"]["metrics"] != rep["student_initial"]["metrics"]  # it trained
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(out / "student" / "model.safetensors").values())


def test_teacher_answers_from_the_data_are_scored_not_regenerated(tiny, tmp_path, monkeypatch):
    """eval.teacher_answers: data — the held-out responses are the teacher's own answers: its accuracy
    is scored from them and only the students generate."""
    from kdistill import evaluate as pl

    calls = []
    real = pl.task_accuracy

    def counting(model, *a, **k):
        calls.append(model)
        return real(model, *a, **k)

    monkeypatch.setattr(pl, "task_accuracy", counting)
    out = tmp_path / "run"
    rep = run(load_config(base=base_config(tiny, out, train={"max_steps": 1},
                                           eval={"teacher_answers": "data", "speed_prompts": 0})), progress=False)
    rows = [json.loads(l) for l in (tiny / "eval.jsonl").read_text().splitlines()][:200]
    want = sum(r["reference"] in r["response"].split() for r in rows) / len(rows)
    assert rep["teacher"]["metrics"]["accuracy"] == pytest.approx(want)
    assert len(calls) == 2  # the initial and the trained student; not the teacher


def test_periodic_eval_and_best_student_selection(tiny, tmp_path):
    """eval.every logs eval_* rows; eval.select_best keeps the student of the best evaluation, which
    is then the reported and saved student."""
    out = tmp_path / "run"
    # a learning rate far too high: the student is best early and then gets worse, so the choice matters
    cfg = base_config(tiny, out, train={"max_steps": 6, "learning_rate": 0.3, "lr_scheduler": "constant"},
                      eval={"generate": False, "speed_prompts": 0, "every": 2, "select_best": "kl_to_teacher"},
                      data={"max_eval_rows": 4})
    rep = run(load_config(base=cfg), progress=False)
    rows = _metrics(out)
    evals = {r["step"]: r["eval_kl_to_teacher"] for r in rows if "eval_kl_to_teacher" in r}
    assert sorted(evals) == [2, 4, 6] and all("loss" in r for r in rows)
    best_step = min(evals, key=evals.get)
    assert best_step != 6  # not simply the last student
    sel = rep["training"]["selected"]
    assert sel["step"] == best_step and sel["value"] == evals[best_step]
    assert rep["student"]["metrics"]["kl_to_teacher"] == pytest.approx(evals[best_step], abs=1e-6)
    with pytest.raises(Exception, match="eval.select_best needs eval.every"):
        load_config(base=base_config(tiny, out, eval={"select_best": "accuracy"}))


@pytest.mark.parametrize("ga", [1, 2])
def test_trainer_shows_a_method_the_next_steps_batches_early(tiny, tmp_path, monkeypatch, ga):
    """A teacher with ``prefetch`` (as a served one has) makes method logit look ahead: before a
    step's teacher signal is asked for, the next step's micro-batches were already handed over, and
    they are exactly the batches that step then trains on; nothing past the last step is drawn, and
    the losses equal a run without lookahead."""
    from kdistill.teachers.local import LocalTeacher

    def go(tag):
        cfg = base_config(tiny, tmp_path / tag, train={"max_steps": 3, "batch_size": 4, "gradient_accumulation_steps": ga},
                          eval={"generate": False, "speed_prompts": 0}, data={"max_eval_rows": 2})
        run(load_config(base=cfg), progress=False)
        return [r["loss"] for r in _metrics(tmp_path / tag)]

    plain = go("plain")
    events: list = []
    signal = LocalTeacher.signal

    def recorded_signal(self, batch, *a, **k):
        if batch.get("ids") and all(i is not None for i in batch["ids"]):
            events.append(("signal", tuple(batch["ids"])))
        return signal(self, batch, *a, **k)

    monkeypatch.setattr(LocalTeacher, "prefetches", True)
    monkeypatch.setattr(LocalTeacher, "prefetch", lambda self, b: events.append(("ahead", tuple(b["ids"]))))
    monkeypatch.setattr(LocalTeacher, "signal", recorded_signal)
    assert go("ahead") == plain
    trained = [key for kind, key in events if kind == "signal"]
    assert len(trained) == 3 * ga and len(set(trained)) == 3 * ga
    for s in range(2):  # steps 1 and 2: the next step's batches were handed over before this step's signal
        first_signal = events.index(("signal", trained[s * ga]))
        announced = [key for kind, key in events[:first_signal] if kind == "ahead"]
        assert set(trained[(s + 1) * ga:(s + 2) * ga]) <= set(announced)
    assert {key for kind, key in events if kind == "ahead"} == set(trained)  # nothing beyond the last step
