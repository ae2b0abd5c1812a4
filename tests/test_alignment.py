"""Alignment of two tokenizations of the same answer (character-level vs byte-level BPE with merges),
checked by hand on strings with multi-byte characters, whitespace and special tokens; the vocabulary
classes; what the pre-flight prints."""

import pytest

from conftest import make_tokenizer
from kdistill.alignment import (TurnRenderer, align, answer_from_ids, decode_ends, encode_aligned, end_of_turn,
                                token_ends)
from kdistill.data import Example, Renderer
from kdistill.vocab_match import describe_differences, token_keys, vocab_classes
from tiny_pair import make_char_tokenizer


@pytest.fixture(scope="module")
def toks():
    return make_char_tokenizer(("▁b", "<0xC3>")), make_tokenizer()


def _spans(ch, bpe, response, prompt="what is the first name alpha beta", t_renderer=None, t_eot=None):
    rs, rt = Renderer(ch, 256), t_renderer or Renderer(bpe, 256)
    ex = Example(id="x", messages=[{"role": "user", "content": prompt}], response=response)
    fs, ft = encode_aligned(rs, ex, end_of_turn(rs)), encode_aligned(rt, ex, t_eot or end_of_turn(rt))
    assert fs["input_ids"] == rs.encode(ex)["input_ids"] and fs["labels"] == rs.encode(ex)["labels"]
    assert ft["input_ids"] == rt.encode(ex)["input_ids"] and ft["labels"] == rt.encode(ex)["labels"]
    for f in (fs, ft):  # every aligned position is a trained (labelled) token
        a = f["answers"][0]
        assert all(f["labels"][p] != -100 for p in a.positions + ([a.eot] if a.eot is not None else []))
    return [("".join(ch.convert_ids_to_tokens([fs["input_ids"][p] for p in s])),
             bpe.convert_ids_to_tokens([ft["input_ids"][p] for p in t])) for s, t in align(fs["answers"][0],
                                                                                         ft["answers"][0])]


def test_token_ends_on_multibyte_pieces():
    # byte-level BPE splits "é" (chars 3..4) into two pieces with the same offsets: the first ends nowhere
    assert token_ends([(0, 3), (3, 4), (3, 4), (4, 5)]) == [3, None, 4, 5]


def test_worked_example_multibyte_and_end_of_turn(toks):
    ch, bpe = toks
    assert _spans(ch, bpe, "Kenji café") == [
        ("K", ["K"]), ("en", ["en"]), ("j", ["j"]), ("i", ["i"]), (" ", ["Ġ"]), ("c", ["c"]), ("a", ["a"]),
        ("f", ["f"]), ("é", ["Ã", "©"]), ("</s>", ["<|im_end|>"])]


def test_whitespace_runs_tabs_and_newlines(toks):
    ch, bpe = toks
    assert _spans(ch, bpe, "alpha  beta\tgamma\n") == [
        ("a", ["a"]), ("lpha", ["lpha"]), (" ", ["Ġ"]), (" beta", ["Ġbeta"]), ("\t", ["ĉ"]), ("g", ["g"]),
        ("amma", ["amma"]), ("\n", ["Ċ"]), ("</s>", ["<|im_end|>"])]


def test_three_byte_characters_and_surrounding_spaces(toks):
    ch, bpe = toks
    assert _spans(ch, bpe, " naïve 日本 ") == [
        (" n", ["Ġn"]), ("a", ["a"]), ("ï", ["Ã", "¯"]), ("v", ["v"]), ("e", ["e"]), (" ", ["Ġ"]),
        ("日", ["æ", "Ĺ", "¥"]), ("本", ["æ", "ľ", "¬"]), (" ", ["Ġ"]), ("</s>", ["<|im_end|>"])]


def test_special_tokens_stay_out_of_text_spans(toks):
    """The template's <|im_start|>assistant and trailing newline are never aligned; only the two ends of turn."""
    ch, bpe = toks
    spans = _spans(ch, bpe, "what is the first name")
    assert spans[-1] == ("</s>", ["<|im_end|>"])
    assert all("<|im_start|>" not in t and "Ċ" not in t for _, t in spans)
    assert "".join(s for s, _ in spans[:-1]) == "what is the first name"


def test_end_of_turn_given_as_text_for_a_template_less_teacher(toks):
    ch, bpe = toks
    plain = make_tokenizer()
    plain.chat_template = None
    r = TurnRenderer(plain, 256, end_of_turn="\n")
    assert end_of_turn(r, text="\n").text == "\n"
    ex = Example(id="x", messages=[{"role": "user", "content": "Name: Kenji\nFirst name:"}], response=" Kenji")
    f = encode_aligned(r, ex, end_of_turn(r, text="\n"))
    assert plain.convert_ids_to_tokens([f["input_ids"][f["answers"][0].eot]]) == ["Ċ"]
    assert plain.decode(f["input_ids"]).endswith("First name:\n Kenji\n")  # no EOS: the few-shot format
    assert _spans(ch, plain, " Kenji", t_renderer=r, t_eot=end_of_turn(r, text="\n"))[-1] == ("</s>", ["Ċ"])


def test_teacher_renderer_adds_the_bos_its_tokenizer_adds_by_itself(toks):
    """A template-less tokenizer whose post-processor adds BOS (Gemma) gets it in the teacher's plain text."""
    from tokenizers import processors

    ch = make_char_tokenizer()
    ch.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    assert ch("ab")["input_ids"][0] == ch.bos_token_id and not getattr(ch, "add_bos_token", False)
    r = TurnRenderer(ch, 64, end_of_turn="\n")
    ex = Example(id="x", messages=[{"role": "user", "content": "Name: Ada\nFirst name:"}], response="Ada")
    assert r.prompt_ids(ex)[0] == ch.bos_token_id and Renderer(ch, 64).prompt_ids(ex)[0] != ch.bos_token_id
    f = encode_aligned(r, ex, end_of_turn(r, text="\n"))
    assert f["input_ids"] == r.encode(ex)["input_ids"] and f["input_ids"][0] == ch.bos_token_id
    a = f["answers"][0]
    assert "".join(ch.convert_ids_to_tokens([f["input_ids"][p] for p in a.positions])) == "Ada"
    assert ch.convert_ids_to_tokens([f["input_ids"][a.eot]]) == ["\n"]


def test_decode_ends_for_sampled_non_canonical_ids(toks):
    """A sampler may emit "alpha" as five one-letter tokens: each still ends on its character."""
    _, bpe = toks
    ids = bpe.convert_tokens_to_ids(list("alpha")) + bpe.convert_tokens_to_ids(["Ã", "©"])
    text, ends = decode_ends(bpe, ids)
    assert text == "alphaé" and ends == [1, 2, 3, 4, 5, None, 6]
    text, ans = answer_from_ids(bpe, ids + [bpe.eos_token_id], start=10, eot=end_of_turn(Renderer(bpe, 64)))
    assert text == "alphaé" and ans.positions == list(range(10, 17)) and ans.eot == 17


def test_truncation_drops_tokens_past_max_length(toks):
    ch, _ = toks
    r = Renderer(ch, 35)
    ex = Example(id="x", messages=[{"role": "user", "content": "what is the first name"}], response="alpha beta gamma")
    f = encode_aligned(r, ex, end_of_turn(r))
    assert len(f["input_ids"]) == 35 and f["input_ids"] == r.encode(ex)["input_ids"]
    a = f["answers"][0]  # prompt + newline: positions 0..22; "alpha beta" of the answer fits, then the cut
    assert a.eot is None and a.positions == list(range(23, 35)) and a.ends == list(range(1, 13))


def test_token_keys_undo_each_familys_space_and_byte_markers(toks):
    ch, bpe = toks
    kb = token_keys(bpe, len(bpe))
    assert kb[bpe.convert_tokens_to_ids("Ġbeta")] == b" beta"
    assert kb[bpe.convert_tokens_to_ids("Ã")] == b"\xc3"
    assert kb[bpe.eos_token_id] == ("special", "<|im_end|>")
    kc = token_keys(ch, len(ch))
    assert kc[ch.convert_tokens_to_ids("▁b")] == b" b" and kc[ch.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
    assert kc[ch.convert_tokens_to_ids("é")] == "é".encode()


def test_vocab_classes_match_strings_and_pair_the_ends_of_turn(toks):
    ch, bpe = toks
    c = vocab_classes(ch, bpe, len(ch), len(bpe), [ch.eos_token_id], [bpe.eos_token_id])
    cls = lambda tok, side, t: int(side[tok.convert_tokens_to_ids(t)])  # noqa: E731
    assert cls(ch, c.student, "a") == cls(bpe, c.teacher, "a") >= 0
    assert cls(ch, c.student, " ") == cls(bpe, c.teacher, "Ġ") >= 0
    assert cls(ch, c.student, "<0xC3>") == cls(bpe, c.teacher, "Ã") >= 0  # the same byte
    assert cls(ch, c.student, "▁b") == cls(bpe, c.teacher, "Ġb") >= 0
    assert cls(ch, c.student, "</s>") == cls(bpe, c.teacher, "<|im_end|>") == 0  # ends of turn: one class
    assert cls(bpe, c.teacher, "Ġbeta") == -1  # no such string in the character vocabulary
    lines = describe_differences(ch, bpe, len(ch), len(bpe), end_of_turn(Renderer(ch, 8)), end_of_turn(Renderer(bpe, 8)), c)
    text = "\n".join(lines)
    assert f"teacher {len(bpe):,} tokens, student {len(ch):,}" in text
    assert "teacher uses <|im_start|>, student none" in text
    assert "'<|im_end|>' -> student '</s>'" in text


def test_context_turns_are_not_answers_on_either_side(toks):
    """A worked example (an assistant turn marked ``"train": false``) is prompt on both sides: the
    aligned encoding equals the plain one and holds one answer, the trained one, so the student's
    answer is aligned with the teacher's answer and not with the example (one walk:
    ``Renderer.assemble``)."""
    ch, bpe = toks
    ex = Example(id="x", messages=[{"role": "user", "content": "name alpha beta"},
                                   {"role": "assistant", "content": "alpha", "train": False},
                                   {"role": "user", "content": "name gamma delta"}], response="gamma")
    for r in (Renderer(ch, 256), Renderer(bpe, 256), TurnRenderer(bpe, 256, chat_template=False, end_of_turn="\n")):
        f, plain = encode_aligned(r, ex, end_of_turn(r, (), "\n" if isinstance(r, TurnRenderer) else None)), r.encode(ex)
        assert f["input_ids"] == plain["input_ids"] and f["labels"] == plain["labels"]
        assert len(f["answers"]) == 1
        trained = [i for i, l in zip(f["input_ids"], f["labels"]) if l != -100]
        assert "gamma" in r.tok.decode(trained) and "alpha" not in r.tok.decode(trained)
