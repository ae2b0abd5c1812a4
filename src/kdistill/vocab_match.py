"""Which tokens of two vocabularies are the same string, and what else differs between two tokenizers.

Token strings are compared as the bytes they stand for, after undoing each family's encoding:

* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): every byte is written as a printable character
  (``Ġ`` = space, ``Ċ`` = newline, ``Ã©`` = the two bytes of ``é``); mapped back to bytes;
* SentencePiece (Llama 2, Gemma, T5): ``▁`` marks a space, ``<0xNN>`` is a raw byte;
* anything else: the token's UTF-8 bytes.

So ``Ġthe`` (GPT-2) and ``▁the`` (SentencePiece) are the same token, `` the``. Special tokens match
only a special token of the same name. Tokens with equal bytes form a *class* when the class has
members in both vocabularies (a vocabulary may hold two ids for one string, e.g. ``A`` and
``<0x41>``: they share the class). The teacher's end-of-turn tokens and the student's form one
class of their own, whatever their strings (:func:`vocab_classes`).
"""

from __future__ import annotations

import json
import re
from typing import Optional, Sequence

import torch

from kdistill.losses.cross_tokenizer import VocabClasses

__all__ = ["describe_differences", "token_keys", "vocab_classes"]

_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()


def _is_byte_level(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return hasattr(tok, "byte_decoder")
    try:
        dec = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    except Exception:  # noqa: BLE001 - an unknown decoder: not byte level
        return False

    def has(d) -> bool:
        return isinstance(d, dict) and (d.get("type") == "ByteLevel" or any(has(x) for x in d.get("decoders") or []))

    return has(dec)


def _special_ids(tok) -> set[int]:
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for i, t in (getattr(tok, "added_tokens_decoder", {}) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def token_keys(tok, size: int) -> list:
    """Per id below ``size``: ``bytes`` it stands for, ``("special", name)``, or None (no token)."""
    n = min(size, len(tok))
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    special = _special_ids(tok)
    byte_level = _is_byte_level(tok)
    keys: list = []
    for i, p in enumerate(pieces):
        if p is None:
            keys.append(None)
        elif i in special:
            keys.append(("special", p))
        elif byte_level and all(c in _BYTE_DECODER for c in p):
            keys.append(bytes(_BYTE_DECODER[c] for c in p))
        else:
            m = _HEX_BYTE.match(p)
            keys.append(bytes([int(m.group(1), 16)]) if m else p.replace("▁", " ").encode("utf-8"))
    return keys + [None] * (size - n)


def vocab_classes(student_tok, teacher_tok, student_size: int, teacher_size: int, student_eot: Sequence[int] = (),
                  teacher_eot: Sequence[int] = ()) -> VocabClasses:
    """Classes of tokens that are the same string in both vocabularies (see the module docstring);
    ``*_eot``: the end-of-turn ids of each side, which form one class together (class 0)."""
    s_keys, t_keys = token_keys(student_tok, student_size), token_keys(teacher_tok, teacher_size)
    s_eot, t_eot = set(int(i) for i in student_eot), set(int(i) for i in teacher_eot)
    eot_key = ("end-of-turn",)
    for keys, eot in ((s_keys, s_eot), (t_keys, t_eot)):
        for i in eot:
            if i < len(keys):
                keys[i] = eot_key
    both = {k for k in s_keys if k is not None} & {k for k in t_keys if k is not None}
    index = {eot_key: 0} if eot_key in both else {}
    for k in both:
        index.setdefault(k, len(index))

    def classes(keys) -> torch.Tensor:
        return torch.tensor([index.get(k, -1) if k is not None else -1 for k in keys], dtype=torch.long)

    return VocabClasses(classes(s_keys), classes(t_keys), len(index))


def _template_name(tok) -> str:
    t = getattr(tok, "chat_template", None)
    if not t:
        return "none"
    for marker in ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "[INST]", "<|user|>"):
        if marker in str(t):
            return f"uses {marker}"
    return "custom"


def describe_differences(student_tok, teacher_tok, student_size: int, teacher_size: int, student_eot,
                         teacher_eot, classes: Optional[VocabClasses] = None) -> list[str]:
    """What differs between the two tokenizers, one line each (printed before a cross-tokenizer run)."""

    def tokname(tok, attr):
        v = getattr(tok, attr, None)
        return repr(v) if v is not None else "none"

    lines = [f"vocabulary: teacher {teacher_size:,} tokens, student {student_size:,}"]
    if classes is not None:
        matched = int((classes.teacher >= 0).sum())
        lines.append(f"same string in both: {matched:,} teacher tokens ({matched / max(teacher_size, 1):.1%}), "
                     f"{int((classes.student >= 0).sum()):,} student tokens, in {classes.n:,} classes")
    lines.append(f"chat template: teacher {_template_name(teacher_tok)}, student {_template_name(student_tok)}")
    lines.append(f"BOS: teacher {tokname(teacher_tok, 'bos_token')}, student {tokname(student_tok, 'bos_token')}; "
                 f"EOS: teacher {tokname(teacher_tok, 'eos_token')}, student {tokname(student_tok, 'eos_token')}")
    lines.append(f"end of turn: teacher {teacher_eot.describe(teacher_tok)} -> student {student_eot.describe(student_tok)}"
                 " (aligned with each other, not by string)")
    return lines
