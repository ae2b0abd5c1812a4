"""Width pruning (student.init.width) and the cut search (student.init.search), on tiny models made in code."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import base_config, make_llama
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.models import cut_student
from kdistill.models.width import count_pruned, prune_width, width_plan, width_scores
from kdistill.run import run

QUIET = {"generate": False, "speed_prompts": 0}


def _batches(vocab: int = 256, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding is not counted
    return [{"input_ids": ids, "attention_mask": mask}]


def _arch(kind: str, tied: bool = False):
    """A tiny model of each supported architecture (GQA: 8 query heads in 2 groups of 4)."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    extra = {"qwen2": {}, "qwen3": {"head_dim": 8}}.get(kind, {})
    torch.manual_seed(0)
    cfg = CONFIG_MAPPING[kind](vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=8, num_key_value_heads=2, initializer_range=0.2,
                               max_position_embeddings=128, tie_word_embeddings=tied, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)])
def test_keep_fraction_one_is_the_teacher(kind, tied):
    model = _arch(kind, tied)
    b = _batches()[0]
    plan = width_plan(model, width_scores(model, _batches()), [0, 1, 2], {"mlp": 1.0, "heads": 1.0, "hidden": 1.0})
    pruned = prune_width(model, plan)
    assert pruned is not model
    with torch.no_grad():
        assert torch.equal(pruned(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
                           model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits)


def test_requested_sizes_load_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _arch("llama")
    scores = width_scores(model, _batches())
    plan = width_plan(model, scores, [0, 1, 2], {"mlp": 0.5, "heads": 0.5, "hidden": 0.7})
    pruned = prune_width(model, plan)
    c = pruned.config  # 0.7 · 64 = 44.8 hidden channels -> 44, a multiple of the 4 query heads kept
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.head_dim) == (48, 4, 1, 44, 8)
    assert count_pruned(model, [0, 1, 2], {"mlp": 0.5, "heads": 0.5, "hidden": 0.7}) == sum(
        p.numel() for p in pruned.parameters())
    # the most active channels are the ones kept (per block for the MLP, summed over norms for hidden)
    assert plan["mlp"]["keep"][1] == sorted(scores["mlp"][1].topk(48).indices.tolist())
    assert plan["hidden"]["keep"] == sorted((scores["hidden"].sum(0) + scores["final"]).topk(44).indices.tolist())
    pruned.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, pruned(input_ids=ids).logits)


def test_gqa_groups_stay_whole_and_silent_units_go_first():
    """Group 1's values are zeroed (its 4 query heads output nothing) and half of the MLP channels
    never fire: pruning keeps group 0 whole with its own query heads, drops the silent channels, and
    the pruned model computes exactly what the teacher computes."""
    model = _arch("llama")
    hd = model.config.head_dim
    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.v_proj.weight[hd:2 * hd] = 0.0  # KV head 1 (query heads 4-7) contributes nothing
            blk.mlp.up_proj.weight[1::2] = 0.0  # odd channels: act(gate) * 0 = 0
    scores = width_scores(model, _batches())
    assert float(scores["heads"][:, 1].max()) == 0.0 and float(scores["mlp"][:, 1::2].max()) == 0.0
    plan = width_plan(model, scores, [0, 1, 2], {"mlp": 0.5, "heads": 0.5})
    assert plan["heads"]["keep"] == [[0], [0], [0]] and plan["mlp"]["keep"][0] == list(range(0, 96, 2))
    pruned = prune_width(model, plan)
    blk, src = pruned.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert torch.equal(blk.q_proj.weight, src.q_proj.weight[: 4 * hd])  # query heads 0-3 go with KV head 0
    assert torch.equal(blk.k_proj.weight, src.k_proj.weight[:hd])
    assert torch.equal(blk.o_proj.weight, src.o_proj.weight[:, : 4 * hd])
    b = _batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_depth_and_width_combine():
    model = _arch("llama")
    scores = width_scores(model, _batches())
    plan = width_plan(model, scores, [0, 2], {"mlp": 0.25})
    assert plan["mlp"]["keep"][1] == sorted(scores["mlp"][2].topk(24).indices.tolist())  # block 1 of the cut = block 2
    pruned = prune_width(cut_student(model, [0, 2]), plan)
    assert len(pruned.model.layers) == 2 and pruned.config.intermediate_size == 24
    assert pruned.config.kdistill_teacher_layers == [0, 2]


def test_pruned_student_distills_and_resumes_with_its_width(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w"
    width = {"mlp": 0.5, "heads": 0.5, "hidden": 0.5}
    cfg = base_config(tiny, out, student={"init": {"num_layers": 3, "layer_selection": "first", "width": width}},
                      train={"max_steps": 6, "save_every": 3}, eval=QUIET, data={"max_eval_rows": 8})
    rep = run(load_config(base=cfg), progress=False)
    assert rep["student"]["metrics"]["kl_to_teacher"] < rep["student_initial"]["metrics"]["kl_to_teacher"]
    assert rep["student"]["init"]["width"] == {"mlp": {"fraction": 0.5, "size": 64}, "heads": {"fraction": 0.5, "size": 1},
                                               "hidden": {"fraction": 0.5, "size": 32}}
    assert rep["student"]["params"] < rep["teacher"]["params"] / 3
    saved = json.loads((out / "student_layers.json").read_text())
    assert saved["layers"] == [0, 1, 2] and len(saved["width"]["mlp"]["keep"]) == 3
    m = AutoModelForCausalLM.from_pretrained(out / "student")
    assert (m.config.hidden_size, m.config.intermediate_size, m.config.num_key_value_heads) == (32, 64, 1)
    assert "width kept: mlp 64 (0.5)" in (out / "report.md").read_text()
    cfg["train"]["max_steps"], cfg["train"]["resume"] = 8, "accept_changes"  # a rerun continues the same pruned student from its checkpoint
    again = run(load_config(base=cfg), progress=False)
    assert again["training"]["resumed_from"] == 6 and json.loads((out / "student_layers.json").read_text()) == saved
    cfg["student"]["init"]["width"] = {"mlp": 0.25}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2  # one line: the width cannot change


def test_cut_search_picks_the_lowest_probe_kl(tiny, tmp_path):
    out = tmp_path / "s"
    cfg = base_config(tiny, out, student={"init": {"search": {"target_params": 0.6, "probe_steps": 2,
                                                              "probe_eval_rows": 8, "depth_levels": 3}}},
                      train={"max_steps": 2}, eval=QUIET, data={"max_eval_rows": 4})
    rep = run(load_config(base=cfg), progress=False)
    search = rep["student"]["init"]["search"]
    table = search["candidates"]
    assert [c["kind"] for c in table] == ["depth-only", "depth+width", "width-only"]
    assert all(c["params"] <= search["target_params"] * 1.02 for c in table)
    best = min(range(len(table)), key=lambda i: table[i]["kl_after"])
    assert search["chosen"] == best and rep["student"]["teacher_layers"] == rep["student"]["init"]["layers"]
    assert len(rep["student"]["init"]["layers"]) == table[best]["num_layers"]
    assert rep["student"]["params"] == table[best]["params"]
    assert all(c["kl_after"] < c["kl_before"] for c in table)  # every probe learned something
    assert "Cut search at" in (out / "report.md").read_text()


def test_search_and_width_config_errors(tiny, tmp_path):
    search = {"target_params": 0.5}
    with pytest.raises(ConfigError, match="student.init.search: picks num_layers and width itself"):
        load_config(base=base_config(tiny, tmp_path / "a", student={"init": {"num_layers": 2, "search": search}}))
    with pytest.raises(ConfigError, match=r"student.init.width.mlp"):
        load_config(base=base_config(tiny, tmp_path / "b", student={"init": {"width": {"mlp": 0}}}))
    with pytest.raises(ConfigError, match=r"student.init.width.head: unknown key; did you mean 'heads'"):
        load_config(base=base_config(tiny, tmp_path / "c", student={"init": {"width": {"head": 0.5}}}))
    big = {**search, "candidates": [{"num_layers": 4}]}
    cfg = load_config(base=base_config(tiny, tmp_path / "d", student={"init": {"search": big}}, eval=QUIET))
    with pytest.raises(ConfigError, match=r"student.init.search.candidates\[0\]: .* over the budget"):
        run(cfg, progress=False)


def test_probe_kl_from_cached_teacher_states_equals_the_evaluation():
    """The search scores probes from the teacher's final hidden states computed once; that KL equals
    the held-out evaluation's (kdistill.evaluate.logit_metrics), which runs the teacher."""
    from kdistill.cut_search import held_kl
    from kdistill.data import collate
    from kdistill.models import final_hidden

    teacher, student = make_llama(256, layers=4), make_llama(256, layers=2, seed=1)
    g = torch.Generator().manual_seed(0)
    feats = [{"input_ids": torch.randint(0, 256, (n,), generator=g).tolist(), "id": str(n)} for n in (7, 11, 9, 5)]
    for f in feats:
        f["labels"] = [-100] * 3 + f["input_ids"][3:]
    held = [{**collate(feats[i: i + 2], 0), "feats": feats[i: i + 2], "pad": 0} for i in (0, 2)]
    hidden = [final_hidden(teacher, b["input_ids"], b["attention_mask"]).detach() for b in held]
    cached = held_kl(student, teacher, held, hidden, 256)
    asked = held_kl(student, teacher, held, None, 256)  # the evaluation's path
    assert cached == pytest.approx(asked, rel=1e-5) and cached > 0
