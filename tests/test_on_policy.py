"""method: on_policy (GKD): student-sampled batches, lambda = 0 == method: logit."""

import json

import torch

from conftest import base_config
from kdistill.config import load_config
from kdistill.data import IGNORE_INDEX, Renderer, collate, collate_prompts, encode_examples, load_examples
from kdistill.data import completion_feature
from kdistill.models import cut_at_eos
from kdistill.methods import RunContext, build_method
from kdistill.models import StudentLM
from kdistill.models import load_model
from kdistill.run import run
from kdistill.teachers import LocalTeacher


def fast(tiny, out, **sections):
    """A config whose evaluation is cheap (no generation, no speed test, few rows)."""
    cfg = base_config(tiny, out, **sections)
    cfg["eval"] = {**cfg["eval"], "generate": False, "speed_prompts": 0}
    cfg["data"] = {**cfg["data"], "max_eval_rows": 4}
    return cfg


def context(tiny, tmp_path, **on_policy):
    cfg = load_config(base=fast(tiny, tmp_path / "ctx", method="on_policy", on_policy=on_policy))
    teacher, tok = load_model(str(tiny / "teacher"))
    student, _ = load_model(str(tiny / "student"))
    renderer = Renderer(tok, cfg.data.max_length)
    rows = load_examples(tiny / "train.jsonl")[:8]
    ctx = RunContext(cfg=cfg, tokenizer=tok, teacher=LocalTeacher(teacher, len(tok)), vocab_size=len(tok),
                     output_dir=tmp_path, renderer=renderer, train_examples=rows)
    feats, _ = encode_examples(renderer, rows)
    return ctx, student, tok, renderer, rows, collate(feats, tok.pad_token_id)


def test_config_defaults_follow_gkd():
    cfg = load_config(base={"output_dir": "x", "method": "on_policy"})
    assert cfg.loss.divergence == "jsd" and cfg.loss.beta == 0.5 and cfg.loss.alpha == 1.0
    assert cfg.on_policy.lambda_ == 0.5
    cfg = load_config(base={"output_dir": "x", "method": "on_policy", "loss": {"divergence": "reverse_kl"},
                            "on_policy": {"lambda": 1.0}})
    assert cfg.loss.divergence == "reverse_kl" and cfg.on_policy.lambda_ == 1.0


def test_cut_at_eos_and_feature():
    assert cut_at_eos([5, 6, 2, 9, 9], {2}) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7], {2}) == [5, 6, 7]
    f = completion_feature([1, 3, 4], [5, 6, 2], "a")
    b = collate([f, completion_feature([1, 3], [8], "b")], pad_id=0)
    # aligned labels: the last prompt position predicts the first completion token; EOS is trained
    assert b["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 2, IGNORE_INDEX]
    assert b["labels"][1].tolist() == [IGNORE_INDEX, 8] + [IGNORE_INDEX] * 4
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]


def test_batches_really_come_from_the_student(tiny, tmp_path):
    ctx, student, tok, renderer, rows, batch = context(tiny, tmp_path, **{"lambda": 1.0, "temperature": 0.0,
                                                                           "max_new_tokens": 6})
    prompts = [renderer.prompt_ids(e) for e in rows]
    # what the student says greedily, computed independently
    b = collate_prompts(prompts, tok.pad_token_id)
    ref = student.generate(**b, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)[:, b["input_ids"].shape[1]:]
    # make a token the student really emits an extra EOS: row 0 stops early, the others do not
    stop = int(ref[0, 2])
    student.generation_config.eos_token_id = [tok.eos_token_id, stop]
    method = build_method("on_policy", ctx)
    out = method.prepare_batch(batch, StudentLM(student))
    assert out["source"] == "student" and out["ids"] == batch["ids"]
    n_eos = 0
    for i, p in enumerate(prompts):
        want = cut_at_eos(ref[i].tolist(), {tok.eos_token_id, stop})
        n = int(out["attention_mask"][i].sum())
        assert out["input_ids"][i, : len(p)].tolist() == p  # the prompt, then the student's completion
        assert out["input_ids"][i, len(p): n].tolist() == want
        lab = out["labels"][i].tolist()
        assert lab[: len(p) - 1] == [IGNORE_INDEX] * (len(p) - 1)  # prompt masked
        assert lab[len(p) - 1: n - 1] == want  # every completion token trained (EOS included)
        assert all(x == IGNORE_INDEX for x in lab[n - 1:])  # nothing after the end
        if want[-1] in (tok.eos_token_id, stop):
            n_eos += 1
            assert len(want) <= 6
    assert len(cut_at_eos(ref[0].tolist(), {stop})) == 3 and n_eos >= 1
    assert int(out["attention_mask"].sum(1).min()) < int(out["attention_mask"].sum(1).max())  # ragged ends
    # the teacher scores the sampled sequences: the loss is finite and has gradients
    wrapper = StudentLM(student)
    loss, info = method.loss(wrapper, out, method.num_items(out))
    loss.backward()
    assert torch.isfinite(loss) and info["on_policy"] == 1.0
    assert method.summary()["on_policy_fraction"] == 1.0


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_lambda_zero_reproduces_logit(tiny, tmp_path):
    common = dict(loss={"divergence": "jsd", "beta": 0.5, "alpha": 0.7, "fused": False}, train={"max_steps": 3})
    rep_a = run(load_config(base=fast(tiny, tmp_path / "logit", **common)), progress=False)
    rep_b = run(load_config(base=fast(tiny, tmp_path / "onp", method="on_policy", on_policy={"lambda": 0.0}, **common)),
                progress=False)
    assert _losses(tmp_path / "logit") == _losses(tmp_path / "onp")
    assert rep_a["student"]["metrics"] == rep_b["student"]["metrics"]
    assert rep_b["method_summary"]["on_policy_fraction"] == 0.0


def test_on_policy_run_reports_fraction(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = fast(tiny, out, method="on_policy", on_policy={"lambda": 0.5, "max_new_tokens": 6}, train={"max_steps": 4})
    rep = run(load_config(base=cfg), progress=False)
    s = rep["method_summary"]
    assert s["batches"] == 4 and s["on_policy_batches"] + s["dataset_batches"] == 4
    assert s["on_policy_fraction"] == s["on_policy_batches"] / 4
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["on_policy"] for r in rows) == s["on_policy_batches"]
    assert "retention" in rep and (out / "report.md").read_text().count("on_policy_fraction") == 1


def test_seq_kd_batches_come_from_the_teacher(tiny, tmp_path):
    ctx, student, tok, renderer, rows, batch = context(tiny, tmp_path, **{"lambda": 0.0, "seq_kd": True,
                                                                           "temperature": 0.0, "max_new_tokens": 5})
    method = build_method("on_policy", ctx)
    out = method.prepare_batch(batch, StudentLM(student))
    assert out["source"] == "teacher"
    prompts = [renderer.prompt_ids(e) for e in rows]
    b = collate_prompts(prompts, tok.pad_token_id)
    ref = ctx.teacher.model.generate(**b, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)[:, b["input_ids"].shape[1]:]
    for i, p in enumerate(prompts):
        n = int(out["attention_mask"][i].sum())
        assert out["input_ids"][i, len(p): n].tolist() == cut_at_eos(ref[i].tolist(), {tok.eos_token_id})
    s = method.summary()
    assert s["teacher_sampled_batches"] == 1 and s["on_policy_fraction"] == 0.0
