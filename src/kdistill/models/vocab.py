"""Do teacher and student share a vocabulary? (A padded output layer is reconciled.)"""

from __future__ import annotations

import hashlib

from torch import nn

from kdistill.errors import ModelError
from kdistill.models.introspect import output_vocab_size


def tokenizer_fingerprint(tok) -> str:
    """A hash of the tokenizer's vocabulary and special tokens (equal = same token ids)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    blob = repr((vocab, tok.eos_token_id, tok.bos_token_id)).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def check_vocab(teacher_tok, student_tok, teacher: nn.Module, student: nn.Module) -> int:
    """Check teacher and student can be compared token by token; return the shared vocab size.

    Same tokenizer with different embedding sizes (a padded vocabulary) is reconciled: logits are
    compared on the first ``len(tokenizer)`` entries. A different tokenizer is an error.
    """
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise ModelError(
            "student.model: its tokenizer differs from the teacher's; logit distillation needs a shared vocabulary "
            "(set loss.cross_tokenizer: uld or gold, or use method: sequence)"
        )
    n_tok = len(teacher_tok)
    vt, vs = output_vocab_size(teacher), output_vocab_size(student)
    if min(vt, vs) < n_tok:
        raise ModelError(f"output layer ({min(vt, vs)} rows) is smaller than the tokenizer ({n_tok} tokens)")
    return min(vt, vs) if vt == vs else n_tok
