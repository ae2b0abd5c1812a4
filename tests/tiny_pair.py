"""A second tiny tokenizer for cross-tokenizer tests: character-level, no chat template, EOS ``</s>``
(the conftest tokenizer is byte-level BPE with merges, ChatML, EOS ``<|im_end|>``)."""

from __future__ import annotations

import string

CHARS = string.ascii_letters + string.digits + " .,:;?!'\"-\n\t" + "éïü日本"


def make_char_tokenizer(extra: tuple[str, ...] = ()):
    """One token per character (plus ``extra`` tokens), specials ``<unk> <pad> <s> </s>``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(CHARS)) + list(extra))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
