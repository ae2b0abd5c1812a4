"""The lean sampling loop (issue 17): the same greedy completions as transformers' generate, rows that
end leave the batch, min_new_tokens and several samples per prompt."""

from __future__ import annotations

import torch

from conftest import make_llama, make_tokenizer
from kdistill.data import collate_prompts
from kdistill.decode import decode, supports_lean_loop
from kdistill.sampling import sample_completions
from kdistill.throughput import clock, linear_params


def _model_and_prompts():
    tok = make_tokenizer()
    model = make_llama(len(tok), layers=2, hidden=64).eval()
    prompts = [[1, 5, 6, 7, 8][: 2 + i % 4] + [9] * (i % 3) for i in range(6)]
    return tok, model, prompts


def test_greedy_matches_generate_and_finished_rows_leave():
    tok, model, prompts = _model_and_prompts()
    assert supports_lean_loop(model)
    ref = sample_completions(model, tok, prompts, 10, 0.0, lean_loop=False)
    assert sample_completions(model, tok, prompts, 10, 0.0) == ref
    model.generation_config.eos_token_id = [ref[0][2]]  # a token some rows write early: they end there
    ref = sample_completions(model, tok, prompts, 10, 0.0, lean_loop=False)
    clock.take()
    got = sample_completions(model, tok, prompts, 10, 0.0)
    _, flops = clock.take()
    assert got == ref and min(map(len, got)) < 10 == max(map(len, got))
    # the model read each row's prompt once and one token per step only while the row was alive
    b = collate_prompts(prompts, tok.pad_token_id)
    per = 2 * linear_params(model)
    assert flops == per * (int(b["attention_mask"].sum()) + sum(len(c) - 1 for c in got))


def test_min_new_tokens_samples_and_seeded_draws():
    tok, model, prompts = _model_and_prompts()
    model.generation_config.eos_token_id = [sample_completions(model, tok, prompts, 4, 0.0)[0][1]]
    got = sample_completions(model, tok, prompts, 8, 0.0, min_new_tokens=8)
    assert all(len(c) == 8 for c in got)
    torch.manual_seed(3)
    a = sample_completions(model, tok, prompts, 6, 1.0, num_samples=3)
    torch.manual_seed(3)
    b = sample_completions(model, tok, prompts, 6, 1.0, num_samples=3)
    assert a == b and len(a) == 18 and len({tuple(c) for c in a[:3]}) > 1  # three draws for prompt 0
    b = collate_prompts(prompts, tok.pad_token_id)
    out = decode(model, b["input_ids"], b["attention_mask"], 5, eos=[], temperature=0.0)
    assert [len(c) for c in out] == [5] * 6
