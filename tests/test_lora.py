"""LoRA students (student.lora, real peft): only adapters train, merged on save, resume, several processes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.models import StudentLM
from kdistill.run import Run, run

QUIET = {"generate": False, "speed_prompts": 0}
LORA = {"r": 4, "alpha": 8}


def _cfg(tiny, out, lora=None, **sections):
    student = {"init": {"num_layers": 2, "layer_selection": [0, 3]}, "lora": {**LORA, **(lora or {})}}
    return base_config(tiny, out, student=student, eval=QUIET, data={"max_eval_rows": 4}, **sections)


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_only_adapters_train_and_the_student_is_saved_merged(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = Run(load_config(base=_cfg(tiny, out, train={"max_steps": 4})), progress=False)
    r.setup()
    r.load_teacher_weights()
    r.load_rows()
    r.load_student()
    student = r.student
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    r.build_teacher()
    r.build_method()
    r.baseline()
    r.fit()
    assert r.method.use_fused(StudentLM(r.student))  # the output layer is not targeted: the fused loss applies
    after = dict(r.student.named_parameters())
    for n, p in before.items():
        if ".lora_B." in n:
            assert not torch.equal(after[n], p), n  # adapters moved (B starts at zero)
        elif ".lora_" not in n:
            assert torch.equal(after[n], p), n  # frozen weights untouched
    teacher = r.t_model
    assert torch.equal(after["base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"],
                       teacher.model.layers[3].mlp.down_proj.weight)  # block 1 of the cut = teacher block 3
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        adapted = r.student(input_ids=ids).logits
    r.final()
    rep = r.report_and_save()
    s = rep["student"]
    assert s["trainable_params"] == sum(before[n].numel() for n in trainable) == s["lora"]["adapter_params"]
    assert s["params"] == sum(p.numel() for n, p in before.items() if ".lora_" not in n)
    saved = load_file(out / "student" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    merged = AutoModelForCausalLM.from_pretrained(out / "student")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "report.json").read_text())["student"]["trainable_params"] == s["trainable_params"]


def test_merge_false_keeps_the_adapter_folder_and_resumes(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    const = {"lr_scheduler": "constant", "save_every": 1}
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    run(load_config(base=_cfg(tiny, clean, train={"max_steps": 4, **const})), progress=False)
    run(load_config(base=_cfg(tiny, resumed, lora={"merge": False}, train={"max_steps": 2, **const})), progress=False)
    rep = run(load_config(base=_cfg(tiny, resumed, lora={"merge": False},
                                   train={"max_steps": 4, "resume": "accept_changes", **const})),
              progress=False)
    assert rep["training"]["resumed_from"] == 2
    assert _losses(resumed) == pytest.approx(_losses(clean), rel=1e-5)
    sdir = resumed / "student"
    assert (sdir / "adapter_config.json").is_file() and (sdir / "adapter_model.safetensors").is_file()
    assert not (sdir / "model.safetensors").exists() and (sdir / "base" / "model.safetensors").is_file()
    cfg = json.loads((sdir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((sdir / "base").resolve())
    base = load_file(sdir / "base" / "model.safetensors")
    teacher = load_file(tiny / "teacher" / "model.safetensors")
    assert torch.equal(base["model.layers.1.self_attn.q_proj.weight"], teacher["model.layers.3.self_attn.q_proj.weight"])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sdir / "base"), sdir)
    merged = AutoModelForCausalLM.from_pretrained(clean / "student")  # the same training, merged
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_with_on_policy_and_a_multi_pass_method(tiny, tmp_path):
    rep = run(load_config(base=_cfg(tiny, tmp_path / "op", method="on_policy", train={"max_steps": 2},
                                    on_policy={"lambda": 1.0, "max_new_tokens": 4})), progress=False)
    assert rep["student"]["trainable_params"] < rep["student"]["params"] / 10
    out = tmp_path / "sd"
    cfg = _cfg(tiny, out, method="self_distill", train={"max_steps": 1},
               self_distill={"iterations": 1, "n": 2, "max_new_tokens": 4, "prompts_per_round": 4})
    rep = run(load_config(base=cfg), progress=False)
    stage = out / "self_distill" / "round-1" / "student"
    assert (stage / "adapter_model.safetensors").is_file() and not (stage / "model.safetensors").exists()
    assert rep["training"]["steps"] == 1 and rep["student"]["lora"]["r"] == 4
    assert "base_layer" not in json.dumps(list(load_file(out / "student" / "model.safetensors")))
    again = run(load_config(base=cfg), progress=False)  # finished rounds are read back from their adapters
    assert again["training"]["resumed_from"] == "round 1 (finished earlier)"
    assert again["student"]["metrics"] == rep["student"]["metrics"]


def test_lora_config_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"student.lora.r"):
        load_config(base=_cfg(tiny, tmp_path / "a", lora={"r": 0}))
    with pytest.raises(ConfigError, match="student.lora: method progressive"):
        load_config(base=_cfg(tiny, tmp_path / "b", method="progressive", progressive={"layers": [1]}))
    with pytest.raises(ConfigError, match="on_policy.engine: a LoRA student"):
        run(load_config(base=_cfg(tiny, tmp_path / "c", method="on_policy", on_policy={"engine": "vllm", "lambda": 0.0})),
            progress=False)
    with pytest.raises(ConfigError, match="student.lora.target_modules: "):
        run(load_config(base=_cfg(tiny, tmp_path / "d", lora={"target_modules": ["no_such_proj"]})), progress=False)


def test_lora_two_processes_train_like_one(tiny, tmp_path):
    """Two processes with one micro-batch each = one process accumulating both (DDP with frozen base
    weights and trained adapters)."""
    from test_distributed import _launch

    one, two = tmp_path / "one", tmp_path / "two"
    run(load_config(base=_cfg(tiny, one, train={"max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 2})),
        progress=False)
    r = _launch(_cfg(tiny, two, train={"max_steps": 2, "batch_size": 4}), tmp_path / "two.yaml", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    w1, w2 = load_file(one / "student" / "model.safetensors"), load_file(two / "student" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
