"""dpo_loss / sequence_logprobs by hand, and DPO training raising the chosen-over-rejected margin."""

import copy
import json
import math

import pytest
import torch

from conftest import base_config
from kdistill.config import load_config
from kdistill.data import Renderer, load_examples
from kdistill.losses import dpo_loss, sequence_logprobs
from kdistill.methods import RunContext
from kdistill.methods.dpo import DPOMethod, collate_pairs, dpo_stage, encode_pair
from kdistill.models import load_model
from kdistill.stages import StageRunner


def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    losses, c, r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: margin = 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; pair 1: 0.5 * ((-3 + 2) - (-1 + 2)) = -1
    want = [math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))]
    assert losses.tolist() == pytest.approx(want, abs=1e-6)
    assert c.tolist() == pytest.approx([0.25, -0.5]) and r.tolist() == pytest.approx([-0.25, 0.5])
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smooth[0].item() == pytest.approx(0.9 * want[0] + 0.1 * math.log1p(math.exp(0.5)), abs=1e-6)
    # gradients flow only into the policy log-probs
    pc.requires_grad_(True)
    rc.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].sum().backward()
    assert pc.grad is not None and rc.grad is None
    assert pc.grad[0].item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-0.5))), abs=1e-6)


def test_sequence_logprobs_counts_only_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [1, -100, -100, -100, 6]])
    lp = torch.log_softmax(logits.float(), -1)
    want = [lp[0, 1, 3] + lp[0, 2, 4], lp[1, 0, 1] + lp[1, 4, 6]]
    got = sequence_logprobs(logits, labels)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([float(w) for w in want], abs=1e-5)


def test_dpo_training_raises_the_margin(tiny, tmp_path):
    cfg = load_config(base=base_config(tiny, tmp_path, method="zephyr", train={"max_steps": 6, "batch_size": 4,
                                                                                 "learning_rate": 5e-3},
                                       dpo={"beta": 0.5}))
    teacher, tok = load_model(str(tiny / "teacher"))
    student, _ = load_model(str(tiny / "student"))
    renderer = Renderer(tok, cfg.data.max_length)
    rows = load_examples(tiny / "train.jsonl")[:8]
    ctx = RunContext(cfg=cfg, tokenizer=tok, teacher=None, vocab_size=len(tok), output_dir=tmp_path,
                     renderer=renderer, train_examples=rows)
    pairs = [encode_pair(renderer, e, e.response, "zulu zulu zulu", e.id) for e in rows]
    b = collate_pairs(pairs[:3], tok.pad_token_id)
    assert b["input_ids"].shape[0] == 6 and DPOMethod(ctx).num_items(b) == 3  # items = pairs
    runner = StageRunner(cfg, tok, teacher, len(tok), torch.device("cpu"), progress=False)
    reference = copy.deepcopy(student)
    trained, summary = dpo_stage(ctx, runner, student, reference, pairs, tmp_path / "dpo", 0.5, 0.0, cfg.train)
    assert summary["pairs"] == 8 and summary["steps"] == 6
    assert summary["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert summary["after"]["logp_margin"] > summary["before"]["logp_margin"]
    assert summary["after"]["reward_margin"] > 0.1 and summary["after"]["reward_accuracy"] > 0.5
    t = summary["training"]
    assert t["train_reward_margin_last"] > t["train_reward_margin_first"]
    # a finished stage is skipped on rerun and gives back the trained model
    again, s2 = dpo_stage(ctx, runner, copy.deepcopy(reference), reference, pairs, tmp_path / "dpo", 0.5, 0.0, cfg.train)
    assert s2.pop("finished_earlier") is True and s2 == summary
    assert torch.equal(again.lm_head.weight, trained.lm_head.weight)


def test_method_dpo_on_a_pairs_file(tiny, tmp_path):
    from conftest import write_jsonl
    from kdistill.run import run

    rows = [json.loads(l) for l in (tiny / "train.jsonl").read_text().splitlines()][:16]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"id": r["id"], "prompt": r["prompt"], "chosen": r["response"],
                                                     "rejected": "zulu zulu zulu"} for r in rows])
    cfg = base_config(tiny, tmp_path / "run", method="dpo", dpo={"pairs": str(pairs), "beta": 0.5},
                      train={"max_steps": 4, "learning_rate": 5e-3})
    cfg["eval"] = {**cfg["eval"], "generate": False, "speed_prompts": 0}
    cfg["data"] = {**cfg["data"], "max_eval_rows": 4}
    rep = run(load_config(base=cfg), progress=False)
    s = rep["method_summary"]
    assert s["pairs"] == 16 and s["steps"] == 4
    assert s["after"]["logp_margin"] > s["before"]["logp_margin"] and s["after"]["reward_accuracy"] > 0.5
    assert (tmp_path / "run" / "dpo" / "done.json").is_file() and "retention" in rep


@pytest.mark.parametrize("name", ["on_policy", "on_policy_filter", "self_distill", "zephyr", "dpo"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    cfg = load_config(str(Path(__file__).parent.parent / "examples" / f"{name}.yaml"))
    assert cfg.method == name


@pytest.mark.parametrize("chunk", [1, 3, "auto"])
def test_label_logprobs_fused_equals_plain_value_and_gradient(chunk):
    """The chunked projection gives the float64 log-softmax values and gradients, 0 at -100."""
    from kdistill.losses import label_logprobs

    torch.manual_seed(1)
    h = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 3, 49, -100, 0, 7], [1, -100, -100, 2, 2, -100]])
    g = torch.randn(2, 6, dtype=torch.float64)
    mask = labels != -100
    ref = torch.log_softmax(h @ w.t(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    (ref * g).sum().backward()
    want_h, want_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = label_logprobs(h, w, labels, chunk)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    assert torch.allclose(got.double(), ref.detach(), atol=1e-5) and (got[~mask] == 0).all()
    (got * g.float()).sum().backward()
    assert torch.allclose(h.grad, want_h, atol=1e-5) and torch.allclose(w.grad, want_w, atol=1e-5)
    assert (h.grad[~mask] == 0).all()


def test_model_label_logprobs_fused_and_plain_paths_agree(tiny):
    """A student wrapper (fused), the bare model (fused) and a model whose head is not hidden @ W.T
    (plain logits) give the same log-probs and the same gradients."""
    from kdistill.models import StudentLM, model_label_logprobs

    model, tok = load_model(str(tiny / "student"))
    model = model.double()
    torch.manual_seed(0)
    ids = torch.randint(3, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.roll(ids, -1, 1)
    labels[:, :3] = -100
    labels[1, 5:] = -100
    wrapper = StudentLM(model)
    assert wrapper.can_fuse
    fused = model_label_logprobs(wrapper, ids, mask, labels, len(tok), chunk_size=4)
    bare = model_label_logprobs(model, ids, mask, labels, len(tok), chunk_size=4)
    fused.sum().backward()
    g_fused = model.lm_head.weight.grad.clone()
    model.zero_grad()
    wrapper.can_fuse = False  # the plain path: the model's own logits
    plain = model_label_logprobs(wrapper, ids, mask, labels, len(tok))
    plain.sum().backward()
    assert torch.allclose(fused.double(), plain.double(), atol=1e-5) and torch.allclose(bare, fused)
    assert torch.allclose(model.lm_head.weight.grad, g_fused, atol=1e-5)
