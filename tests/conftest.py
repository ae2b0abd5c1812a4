"""Tiny models, a tiny tokenizer and data, all made in code (no network)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

# tests/engines/ runs against the real vLLM in its own venv: `make test-engines` (KD_ENGINE_TESTS=1)
collect_ignore = [] if os.environ.get("KD_ENGINE_TESTS") else ["engines"]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ("alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu what is the first name of person in this sentence "
         "answer sentence name bought bike yesterday").split()


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)] + ["user assistant system\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def make_llama(vocab_size: int, layers: int = 4, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(WORDS[:26]), rng.choice(WORDS[:26])
        rows.append({"id": f"r{seed}-{i}", "prompt": f"what is the first name {a} {b}", "response": f"{a} {a} {b}",
                     "reference": a})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A folder with ``teacher/`` (4 layers), ``other_student/`` (different tokenizer),
    ``train.jsonl`` and ``eval.jsonl``."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    teacher = make_llama(len(tok), layers=4)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    small = make_llama(len(tok), layers=2, seed=1)
    small.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    other = make_tokenizer(320)
    make_llama(len(other), layers=2, seed=2).save_pretrained(root / "other_student")
    other.save_pretrained(root / "other_student")
    write_jsonl(root / "train.jsonl", make_rows(64, 1))
    write_jsonl(root / "eval.jsonl", make_rows(16, 2))
    return root


def base_config(tiny: Path, out: Path, **sections) -> dict:
    cfg = {
        "output_dir": str(out),
        "method": "logit",
        "teacher": {"model": str(tiny / "teacher")},
        "student": {"init": {"from_teacher": True, "num_layers": 2, "layer_selection": "first_last"}},
        "data": {"train": str(tiny / "train.jsonl"), "eval": str(tiny / "eval.jsonl"), "max_length": 64},
        "loss": {"divergence": "forward_kl", "temperature": 1.0, "alpha": 1.0},
        "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "save_every": 3, "seed": 0},
        "eval": {"batch_size": 8, "max_new_tokens": 4, "speed_prompts": 2, "speed_new_tokens": 4},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


class Crash(RuntimeError):
    """A simulated crash (see :func:`crash_at_loss`)."""


def crash_at_loss(monkeypatch, n: int) -> None:
    """Make the ``logit`` method raise :class:`Crash` on its n-th loss call (undo: monkeypatch.undo)."""
    from kdistill.methods import logit

    real = logit.LogitMethod.loss
    calls = {"n": 0}

    def flaky(self, model, batch, num_items):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash("simulated crash")
        return real(self, model, batch, num_items)

    monkeypatch.setattr(logit.LogitMethod, "loss", flaky)


def narrow_student(tiny: Path, folder: Path, hidden: int = 32) -> Path:
    """A 2-layer student of another width than the tiny teacher, with its tokenizer, saved in ``folder``."""
    from kdistill.models import load_model

    narrow = make_llama(400, layers=2, seed=3, hidden=hidden)
    _, tok = load_model(str(tiny / "teacher"))
    narrow.resize_token_embeddings(len(tok))
    narrow.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
