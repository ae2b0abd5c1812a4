"""Mixture-of-experts teachers (a tiny Mixtral built in code: 4 experts, top-2 routing) distilled
into dense students with logit, on_policy, the top-k cache and feature distillation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import base_config, make_tokenizer, make_rows, write_jsonl
from kdistill.commands.cache_teacher import cache_teacher
from kdistill.config import load_config
from kdistill.errors import ModelError
from kdistill.models import decoder_layers, param_counts, supports_hidden
from kdistill.models.moe import densify, expert_usage, top_experts
from kdistill.run import run

QUIET = {"generate": False, "speed_prompts": 0}


def make_mixtral(vocab: int, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        initializer_range=0.2, max_position_embeddings=256, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """``moe/teacher`` (Mixtral, 4 experts, top-2), ``moe/student`` (a dense Llama with the same
    tokenizer), ``train.jsonl``, ``eval.jsonl``."""
    from conftest import make_llama

    root = tmp_path_factory.mktemp("moe")
    tok = make_tokenizer()
    make_mixtral(len(tok)).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    make_llama(len(tok), layers=2, seed=1).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    write_jsonl(root / "train.jsonl", make_rows(48, 1))
    write_jsonl(root / "eval.jsonl", make_rows(8, 2))
    return root


def _cfg(moe, out, **sections):
    cfg = base_config(moe, out, eval=QUIET, train={"max_steps": 4, "save_every": 4}, **sections)
    return cfg


def _dense(moe) -> dict:
    """The dense Llama student saved beside the MoE teacher (same tokenizer)."""
    return {"model": str(moe / "student"), "init": None}


def test_moe_introspection_and_parameter_counts():
    m = make_mixtral(256)
    assert supports_hidden(m) and len(decoder_layers(m)) == 4
    c = param_counts(m)
    expert = 3 * 64 * 96  # gate, up, down of one expert
    assert c["experts"] == 4 and c["experts_per_token"] == 2
    assert c["params"] - c["params_active"] == 4 * 2 * expert  # two of four experts idle per block


def make_qwen3_moe(vocab: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, initializer_range=0.2, max_position_embeddings=128)
    return Qwen3MoeForCausalLM(cfg).eval()


@pytest.mark.parametrize("make,dense_kind", [(make_mixtral, "MistralForCausalLM"), (make_qwen3_moe, "Qwen3ForCausalLM")])
def test_dense_student_from_equal_experts_is_the_teacher(make, dense_kind):
    """When every expert of a block is the same MLP, the MoE block is that MLP, and so is the dense
    student's block (the router's top-2 weights sum to 1)."""
    m = make(256)
    with torch.no_grad():
        for blk in m.model.layers:
            blk.mlp.experts.gate_up_proj[:] = blk.mlp.experts.gate_up_proj[2:3].clone()
            blk.mlp.experts.down_proj[:] = blk.mlp.experts.down_proj[2:3].clone()
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    usage = expert_usage(m, [{"input_ids": ids, "attention_mask": mask}])
    assert all(abs(sum(u) - 1) < 1e-6 for u in usage)
    dense = densify(m, top_experts(usage))
    assert type(dense).__name__ == dense_kind and param_counts(dense)["params_active"] == param_counts(dense)["params"]
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, m(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_dense_student_cut_from_a_moe_teacher_learns(moe, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "logit"
    cfg = _cfg(moe, out, student={"init": {"num_layers": 2, "layer_selection": "first_last",
                                           "width": {"mlp": 0.5}}}, data={"max_eval_rows": 8})
    rep = run(load_config(base=cfg), progress=False)
    t, s = rep["teacher"], rep["student"]
    assert t["experts"] == 4 and t["experts_per_token"] == 2 and t["params_active"] < t["params"]
    assert s["params_active"] == s["params"] and "experts" not in s
    assert len(s["init"]["experts"]) == 4 and s["init"]["width"]["mlp"]["size"] == 48
    assert s["metrics"]["kl_to_teacher"] < rep["student_initial"]["metrics"]["kl_to_teacher"]
    dense = AutoModelForCausalLM.from_pretrained(out / "student")
    assert type(dense).__name__ == "MistralForCausalLM" and dense.config.intermediate_size == 48
    assert "active parameters per token" in (out / "report.md").read_text()


def test_moe_teacher_on_policy_and_features(moe, tmp_path):
    rep = run(load_config(base=_cfg(moe, tmp_path / "op", method="on_policy", student=_dense(moe),
                                    on_policy={"lambda": 1.0, "max_new_tokens": 4}, features={"weight": 0.5},
                                    data={"max_eval_rows": 4})), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "op" / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows] == [1.0] * 4 and all(r["feature_loss"] > 0 for r in rows)
    assert rep["method_summary"]["features"]["pairs"] and rep["teacher"]["params_active"] < rep["teacher"]["params"]


def test_moe_teacher_through_the_cache(moe, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(moe, tmp_path / "c", cache={"path": str(cache), "top_k": 8, "shard_size": 16})
    stats = cache_teacher(load_config(base=cfg), say=lambda m: None, progress=False)
    assert stats["rows"] == 48 and stats["top_k"] == 8
    out = tmp_path / "from-cache"
    run_cfg = _cfg(moe, out, teacher={"model": None, "cache": str(cache)}, student=_dense(moe), data={"max_eval_rows": 4})
    # shuffled batches: the first and last step's losses compare like with like (length-grouped
    # batches put the widest micro-batch first, so its loss is not the others')
    run_cfg["train"]["batching"] = "shuffle"
    rep = run(load_config(base=run_cfg), progress=False)
    assert rep["teacher"]["kind"] == "cache" and rep["training"]["steps"] == 4
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_keep_experts_cannot_be_width_pruned(moe, tmp_path):
    cfg = _cfg(moe, tmp_path / "k", student={"init": {"num_layers": 2, "moe": "keep", "width": {"mlp": 0.5}}})
    with pytest.raises(ModelError, match="student.init.width: width pruning supports .*not 'mixtral'"):
        run(load_config(base=cfg), progress=False)
