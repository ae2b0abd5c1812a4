"""on_policy_filter and self_distill: generate -> score -> keep the best -> fine-tune, in rounds."""

import json
import math

from safetensors.torch import load_file

from conftest import base_config
from kdistill.config import load_config
from kdistill.data import completion_feature
from kdistill.scoring import loglik_scores
from kdistill.methods.candidates import OnPolicyFilter
from kdistill.models import load_model
from kdistill.run import run


def fast(tiny, out, **sections):
    cfg = base_config(tiny, out, **sections)
    cfg["eval"] = {**cfg["eval"], "generate": False, "speed_prompts": 0}
    cfg["data"] = {**cfg["data"], "max_eval_rows": 4}
    cfg["train"] = {**cfg["train"], "max_steps": 2}
    return cfg


def read(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_select_keeps_best_per_prompt():
    m = OnPolicyFilter.__new__(OnPolicyFilter)
    m.sc = load_config(base={"output_dir": "x", "on_policy_filter": {"keep": 2, "min_score": -1.0}}).on_policy_filter
    rows = [{"candidates": [{"score": -3.0}, {"score": -0.5}, {"score": -0.9}, {"score": -0.2}]},
            {"candidates": [{"score": -2.0}, {"score": -0.7}, {"score": -5.0}]}]
    kept = [(rows.index(r), k) for r, k in m.select(rows)]
    assert kept == [(0, 3), (0, 1), (1, 1)]  # best two of row 0; row 1's second best is below min_score


def test_filter_keeps_the_teacher_best_candidates(tiny, tmp_path):
    out = tmp_path / "f"
    cfg = fast(tiny, out, method="on_policy_filter",
               on_policy_filter={"rounds": 1, "n": 3, "keep": 1, "max_new_tokens": 6, "prompts_per_round": 8})
    rep = run(load_config(base=cfg), progress=False)
    rdir = out / "on_policy_filter" / "round-1"
    cands, kept = read(rdir / "candidates.jsonl"), read(rdir / "kept.jsonl")
    assert len(cands) == 8 and all(len(r["candidates"]) == 3 for r in cands) and len(kept) == 8
    by_prompt = {k["prompt_id"]: k for k in kept}
    for row in cands:
        best = max(row["candidates"], key=lambda c: c["score"])
        assert by_prompt[row["id"]]["score"] == best["score"]
        assert by_prompt[row["id"]]["completion_ids"] == best["completion_ids"]
    # the scores are the teacher's mean log-likelihood of each candidate
    teacher, tok = load_model(str(tiny / "teacher"))
    row = cands[0]
    feats = [completion_feature(row["prompt_ids"], c["completion_ids"]) for c in row["candidates"]]
    again = loglik_scores(teacher, feats, tok.pad_token_id, len(tok))
    assert [round(s, 4) for s in again] == [round(c["score"], 4) for c in row["candidates"]]
    s = rep["method_summary"]
    assert s["candidates_kept_per_round"] == [8] and s["scorer"] == "loglik"
    assert s["mean_kept_score_per_round"][0] >= s["mean_score_per_round"][0]
    assert (rdir / "scores.json").is_file() and (rdir / "done.json").is_file()
    assert rep["training"]["steps"] == 2 and "retention" in rep


def test_self_distill_rounds_change_the_model_and_write_data(tiny, tmp_path):
    out = tmp_path / "s"
    prompts = tmp_path / "prompts.jsonl"  # prompt-only rows: the model writes the answers
    prompts.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in read(tiny / "train.jsonl")))
    cfg = fast(tiny, out, method="self_distill", data={"train": str(prompts)},
               self_distill={"iterations": 2, "n": 2, "keep_fraction": 0.5, "max_new_tokens": 6, "prompts_per_round": 6})
    rep = run(load_config(base=cfg), progress=False)
    root = out / "self_distill"
    for r in (1, 2):
        d = root / f"round-{r}"
        cands, kept = read(d / "candidates.jsonl"), read(d / "kept.jsonl")
        assert len(cands) == 6 and len(kept) == math.ceil(0.5 * 12)
        scores = sorted((c["score"] for row in cands for c in row["candidates"]), reverse=True)
        assert sorted((k["score"] for k in kept), reverse=True) == scores[: len(kept)]  # the top fraction
        assert json.loads((d / "scores.json").read_text())["kept"] == len(kept)
    teacher = load_file(str(tiny / "teacher" / "model.safetensors"))
    w1 = load_file(str(root / "round-1" / "student" / "model.safetensors"))
    w2 = load_file(str(root / "round-2" / "student" / "model.safetensors"))
    key = "model.embed_tokens.weight"  # the student starts as the teacher's embedding; each round changes it
    assert not w1[key].equal(teacher[key]) and not w2[key].equal(w1[key])
    s = rep["method_summary"]
    assert s["scorer"] == "self" and s["candidates_kept_per_round"] == [6, 6]
    assert rep["training"]["steps"] == 4
    # a rerun skips the finished rounds
    rep2 = run(load_config(base=cfg), progress=False)
    assert rep2["training"]["resumed_from"] == "round 1 (finished earlier)" and rep2["training"]["steps"] == 4


def test_jsonl_store_merges_parts_left_by_a_crash(tmp_path):
    """A multi-process fill killed before its merge leaves <file>.part-r files: the next open
    merges them (torn lines dropped, nothing twice) and fill only makes what is still missing."""
    from kdistill.store import JsonlStore

    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "v": 1}\n')
    (tmp_path / "c.jsonl.part-0").write_text('{"id": "b", "v": 2}\n{"id": "a", "v": 9}\n')
    (tmp_path / "c.jsonl.part-1").write_text('{"id": "c", "v": 3}\n{"id": "d", "v"')  # torn by the kill
    store = JsonlStore(path)
    assert sorted(store.rows) == ["a", "b", "c"] and store.rows["a"]["v"] == 1
    assert not list(tmp_path.glob("*.part-*")) and len(path.read_text().splitlines()) == 3
    made = []
    rows = store.fill(["a", "b", "c", "d", "e"], lambda k: k,
                      lambda ks: made.extend(ks) or [{"id": k, "v": 0} for k in ks], batch_size=2)
    assert made == ["d", "e"] and [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
