"""Cross-tokenizer distillation end to end, on two tiny models whose tokenizers differ: a teacher with a
byte-level BPE tokenizer (merges, ChatML, EOS ``<|im_end|>``) taught the task here, and a student
with a character-level tokenizer (no chat template, EOS ``</s>``)."""

import json
import math

import pytest
import torch
import yaml

from conftest import Crash, base_config, crash_at_loss, make_llama, make_rows, make_tokenizer, write_jsonl
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import Renderer, collate, encode_examples, load_examples
from kdistill.models import load_model
from kdistill.run import run
from kdistill.sampling import sample_completions
from tiny_pair import make_char_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread is faster, and much faster on a machine that is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _set_special_ids(model, tok):
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.bos_token_id, tok.pad_token_id


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``teacher/`` (BPE, trained on the task for 60 steps), ``student/`` and ``student2/`` (character
    level, untrained), ``train.jsonl``, ``eval.jsonl``."""
    root = tmp_path_factory.mktemp("pair")
    write_jsonl(root / "train.jsonl", make_rows(64, 1))
    write_jsonl(root / "eval.jsonl", make_rows(16, 2))
    bpe = make_tokenizer()
    teacher = make_llama(len(bpe), layers=2)
    _set_special_ids(teacher, bpe)
    feats, _ = encode_examples(Renderer(bpe, 64), load_examples(root / "train.jsonl"))
    opt = torch.optim.AdamW(teacher.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    teacher.train()
    for _ in range(60):
        b = collate([feats[i] for i in torch.randint(0, len(feats), (16,), generator=g)], bpe.pad_token_id)
        logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.save_pretrained(root / "teacher")
    bpe.save_pretrained(root / "teacher")
    ch = make_char_tokenizer()
    for name, seed in (("student", 5), ("student2", 6)):
        s = make_llama(len(ch), layers=2, seed=seed)
        _set_special_ids(s, ch)
        s.save_pretrained(root / name)
        ch.save_pretrained(root / name)
    return root


def _cfg(pair, out, cross="gold", **sections):
    cfg = base_config(pair, out, student={"model": str(pair / "student")}, **sections)
    cfg["student"].pop("init")
    cfg["data"]["max_length"] = 96
    cfg["loss"] = {**cfg["loss"], **({"cross_tokenizer": cross} if cross else {}), **sections.get("loss", {})}
    return cfg


def _ends_with_eos(model, tok, rows, n_new=40) -> float:
    r = Renderer(tok, 96)
    comps = sample_completions(model, tok, [r.prompt_ids(e) for e in rows], n_new, temperature=0.0)
    return sum(bool(c) and c[-1] == tok.eos_token_id for c in comps) / len(comps)


def test_gold_run_lowers_bits_per_byte_distance_and_the_student_stops_with_its_own_eos(pair, tmp_path):
    """Pure distillation (alpha 1: no cross-entropy on the data): what the student learns comes from a
    teacher whose tokens it does not share, and its answers end with *its* EOS, as the teacher's end
    with <|im_end|>."""
    out = tmp_path / "gold"
    # shuffled batches: the 50 steps see every length mixed (with length-grouped batches the bits-per-byte
    # check passes too, but which rows come last decides whether the 16th answer already ends with </s>)
    cfg = _cfg(pair, out, train={"max_steps": 50, "learning_rate": 5e-3, "save_every": 50, "batching": "shuffle"},
               eval={"generate": False, "speed_prompts": 0})
    rep = run(load_config(base=cfg), progress=False)
    t_bpb = rep["teacher"]["metrics"]["bits_per_byte"]
    before = abs(rep["student_initial"]["metrics"]["bits_per_byte"] - t_bpb)
    after = abs(rep["student"]["metrics"]["bits_per_byte"] - t_bpb)
    assert after < 0.5 * before
    assert set(rep["unavailable"]) >= {"kl_to_teacher", "top1_agreement"}
    assert rep["retention"]["bits_per_byte"] > 0
    cross = rep["method_summary"]["cross_tokenizer"]
    assert cross["loss"] == "gold" and cross["aligned_student_tokens"] > 0.8 and 0 < cross["matched_teacher_mass"] < 1
    assert cross["end_of_turn_spans"] == 50 * 8  # every row's </s> was aligned with the teacher's <|im_end|>

    rows = load_examples(pair / "eval.jsonl")
    student, tok = load_model(str(out / "student"))
    initial, _ = load_model(str(pair / "student"))
    assert _ends_with_eos(initial, tok, rows) < 0.5
    assert _ends_with_eos(student, tok, rows) == 1.0
    teacher, t_tok = load_model(str(pair / "teacher"))
    assert _ends_with_eos(teacher, t_tok, rows) == 1.0  # the teacher ends its answers with its own EOS


def test_different_tokenizers_without_cross_tokenizer_stop_with_one_line(pair, tmp_path, capsys):
    cfg = _cfg(pair, tmp_path / "no", cross=None)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdistill: error: ")]
    assert len(lines) == 1 and "Traceback" not in err
    assert str(pair / "teacher") in lines[0] and str(pair / "student") in lines[0] and "loss.cross_tokenizer" in lines[0]


def test_cross_tokenizer_run_prints_what_differs(pair, tmp_path):
    said = []
    run(load_config(base=_cfg(pair, tmp_path / "o", cross="uld", train={"max_steps": 1},
                              eval={"generate": False, "speed_prompts": 0})), say=said.append, progress=False)
    text = "\n".join(said)
    assert "loss.cross_tokenizer: uld" in text
    assert "vocabulary: teacher 400 tokens, student 83" in text
    assert "end of turn: teacher '<|im_end|>' -> student '</s>'" in text
    assert "chat template: teacher uses <|im_start|>, student none" in text


def test_uld_resume_after_crash_matches_uninterrupted(pair, tmp_path, monkeypatch):
    quiet = {"generate": False, "speed_prompts": 0}
    train = {"max_steps": 6, "save_every": 3}
    clean = tmp_path / "clean"
    run(load_config(base=_cfg(pair, clean, cross="uld", train=train, eval=quiet, loss={"alpha": 0.5})), progress=False)
    crashed = tmp_path / "crashed"
    cfg = load_config(base=_cfg(pair, crashed, cross="uld", train=train, eval=quiet, loss={"alpha": 0.5}))
    crash_at_loss(monkeypatch, 5)
    with pytest.raises(Crash):
        run(cfg, progress=False)
    monkeypatch.undo()
    rep = run(cfg, progress=False)
    assert rep["training"]["resumed_from"] == 3
    a = [json.loads(line) for line in (clean / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)


def test_on_policy_student_samples_are_re_tokenized_for_the_teacher(pair, tmp_path):
    cfg = _cfg(pair, tmp_path / "op", method="on_policy", train={"max_steps": 2},
               eval={"generate": False, "speed_prompts": 0})
    cfg["on_policy"] = {"lambda": 1.0, "max_new_tokens": 12}
    rep = run(load_config(base=cfg), progress=False)
    ms = rep["method_summary"]
    assert ms["on_policy_batches"] == 2 and ms["cross_tokenizer"]["spans"] > 0
    rows = [json.loads(line) for line in (tmp_path / "op" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


def test_seq_kd_is_refused_across_tokenizers(pair, tmp_path, capsys):
    cfg = _cfg(pair, tmp_path / "sk", method="on_policy")
    cfg["on_policy"] = {"lambda": 0.0, "seq_kd": True}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    assert "seq_kd" in capsys.readouterr().err


def test_several_teachers_with_different_tokenizers(pair, tmp_path):
    """A BPE teacher (cross-tokenizer target) and a character-level one (the student's own
    tokenizer: the ordinary target), combined as a sum of losses."""
    cfg = _cfg(pair, tmp_path / "multi", train={"max_steps": 2}, eval={"generate": False, "speed_prompts": 0})
    cfg.pop("teacher")
    cfg["teachers"] = [{"model": str(pair / "teacher"), "weight": 2.0}, {"model": str(pair / "student2")}]
    said = []
    rep = run(load_config(base=cfg), say=said.append, progress=False)
    assert any("combined as sum (their tokenizers differ)" in s for s in said)
    assert rep["method_summary"]["cross_tokenizer"]["spans"] > 0
    rows = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_bits_per_byte_is_reported_for_every_run(tiny, tmp_path):
    """Same tokenizer too: bits per byte = the response tokens' cross-entropy / ln 2 / response bytes."""
    out = tmp_path / "same"
    rep = run(load_config(base=base_config(tiny, out, train={"max_steps": 1}, eval={"generate": False,
                                                                                      "speed_prompts": 0})),
              progress=False)
    rows = load_examples(tiny / "eval.jsonl")
    _, tok = load_model(str(tiny / "teacher"))
    feats, _ = encode_examples(Renderer(tok, 64), rows)
    n_tokens = sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats)
    n_bytes = sum(len(e.response.encode()) for e in rows)
    for who in ("teacher", "student_initial", "student"):
        m = rep[who]["metrics"]
        assert m["bits_per_byte"] == pytest.approx(math.log(m["perplexity"]) * n_tokens / math.log(2) / n_bytes,
                                                   rel=1e-4)
    assert rep["retention"]["bits_per_byte"] == pytest.approx(
        rep["teacher"]["metrics"]["bits_per_byte"] / rep["student"]["metrics"]["bits_per_byte"], rel=1e-3)


def test_cross_tokenizer_cache_stores_the_teachers_tokenization_and_gives_the_live_loss(pair, tmp_path):
    """cache-teacher with loss.cross_tokenizer keeps the teacher's tokenization of every answer beside
    its top-k (and its tokenizer); a run from that cache alone, without the teacher model, trains on
    the same loss as the live teacher (top-k = the whole vocabulary: only the log-prob grid differs)."""
    from kdistill.commands.cache_teacher import cache_teacher
    from kdistill.topk_cache import TopKCache

    quiet = {"generate": False, "speed_prompts": 0}
    live = tmp_path / "live"
    run(load_config(base=_cfg(pair, live, train={"max_steps": 2}, eval=quiet)), progress=False)
    cfg = _cfg(pair, tmp_path / "unused", train={"max_steps": 2}, eval=quiet)
    cfg["cache"] = {"path": str(tmp_path / "cache"), "top_k": 400, "shard_size": 16}
    stats = cache_teacher(load_config(base=cfg), say=lambda _: None, progress=False)
    assert stats["rows"] == 64 and (tmp_path / "cache" / "teacher_tokenizer" / "tokenizer.json").is_file()
    cache = TopKCache(tmp_path / "cache")
    x = cache.extra(load_examples(pair / "train.jsonl")[0].id)
    assert set(x) == {"token", "label_lp", "end", "turn"}
    assert int((x["end"] == -2).sum()) == 1 and x["end"].max() > 0  # one end of turn; token ends in the answer

    cached = tmp_path / "cached"
    cfg = _cfg(pair, cached, train={"max_steps": 2}, eval=quiet)
    cfg["teacher"] = {"cache": str(tmp_path / "cache")}
    said = []
    rep = run(load_config(base=cfg), say=said.append, progress=False)
    assert any("end of turn: teacher '<|im_end|>' -> student '</s>'" in s for s in said)
    assert rep["method_summary"]["cross_tokenizer"]["end_of_turn_spans"] == 16
    a = [json.loads(line) for line in (live / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (cached / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-3)
