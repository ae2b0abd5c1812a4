"""Align two tokenizations of the same answer: spans of tokens that cover the same characters.

Teacher and student tokenize the same conversation, each rendered with its own chat template
(or, without one, as plain text). Prompt tokens are masked anyway; what must be aligned is every
assistant turn: its *content* (the same characters on both sides) and its *end of turn* (the
token each family ends an answer with).

The algorithm, per assistant turn and per side:

1. Tokenize the turn's rendered segment (``content`` + what the template appends) with character
   offsets: a fast tokenizer's ``return_offsets_mapping``, else by decoding growing prefixes of the
   ids (:func:`decode_ends`). Offsets are shifted so that 0 is the first character of the content.
2. Keep, for each content token, the character where it *ends* — but only when that is a
   character boundary: when byte-level BPE splits a multi-byte character (``é`` = ``Ã`` + ``©``)
   both pieces report the same character, and the first piece does not end anywhere (``None``).
3. The end-of-turn token is found after the content: a token id the family ends turns with
   (``<|im_end|>``, ``<end_of_turn>``, ``</s>``: see :func:`end_of_turn_ids`), or the first token
   of a configured text (e.g. ``"\\n"`` for a base model prompted few-shot).

Then the two sides are cut at every character position where *both* have a token ending
(:func:`align`): each span is a run of student tokens and a run of teacher tokens covering exactly
the same characters (one-to-one, one-to-many or many-to-one), and both models have seen the same
text before it. The end-of-turn tokens form one more span of their own, whatever their strings:
the teacher's end of turn is aligned with the student's, never mapped by string. Tokens after the
last common boundary (a straddling token at the end, a template's trailing newline) are in no span.

Worked example: the answer ``Kenji café`` (10 characters), a character-level student and a
byte-level BPE teacher::

    student  K  e  n  j  i  ␣  c  a  f  é  </s>        ends 1 2 3 4 5 6 7 8 9 10, eot = </s>
    teacher  Ken  ji  ␣caf  Ã  ©  <|im_end|>  \\n       ends 3 5 9 None 10, eot = <|im_end|>
    common boundaries: 3, 5, 9, 10
    spans:   [K e n]~[Ken]  [j i]~[ji]  [␣ c a f]~[␣caf]  [é]~[Ã ©]  [</s>]~[<|im_end|>]

The teacher's trailing ``\\n`` is in no span. The losses (:mod:`kdistill.losses.cross_tokenizer`)
compare, for each span, the two models' next-token distributions just before its first token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from kdistill.data import Example, Renderer

__all__ = ["Answer", "EndOfTurn", "TurnRenderer", "align", "answer_from_ids", "decode_ends", "encode_aligned", "end_of_turn",
           "token_ends", "tokenize_ends"]


@dataclass
class EndOfTurn:
    """How one side ends an answer: token ids (``ids``, the first is its own EOS) or a ``text``."""

    ids: tuple[int, ...] = ()
    text: Optional[str] = None

    def describe(self, tok) -> str:
        if self.text is not None:
            return repr(self.text)
        return ", ".join(repr(tok.convert_ids_to_tokens(i)) for i in self.ids) or "none"


@dataclass
class Answer:
    """One side's tokens of one assistant turn: ``positions`` (indices into ``input_ids``) of the
    content tokens, the character each one ``ends`` at (content coordinates; None = not on a
    character boundary), and the position of the end-of-turn token (``eot``, None = none)."""

    positions: list[int] = field(default_factory=list)
    ends: list[Optional[int]] = field(default_factory=list)
    eot: Optional[int] = None

    def shifted(self, by: int, limit: int) -> "Answer":
        """Positions moved by ``by``; tokens at or past ``limit`` (truncated) dropped."""
        keep = [(p + by, e) for p, e in zip(self.positions, self.ends) if p + by < limit]
        eot = self.eot + by if self.eot is not None and self.eot + by < limit else None
        return Answer([p for p, _ in keep], [e for _, e in keep], eot)


class TurnRenderer(Renderer):
    """A :class:`~kdistill.data.Renderer` for a teacher that reads rows on its own: without a chat
    template its answers end with ``end_of_turn`` (e.g. ``"\\n"`` for a base model prompted
    few-shot) instead of EOS + newline, and its text starts with BOS when its tokenizer adds one to
    plain text by itself (a Gemma base model needs it; the plain renderer asks only ``add_bos_token``;
``extra_bos`` is read by the plain renderer's prompt and answer encoding).
    With a chat template it renders exactly like the plain one."""

    def __init__(self, tokenizer, max_length: int, system_prompt: Optional[str] = None, chat_template: bool = True,
                 end_of_turn: Optional[str] = None):
        super().__init__(tokenizer, max_length, system_prompt, chat_template)
        self.end_of_turn = end_of_turn if not self.use_template else None
        bos = getattr(tokenizer, "bos_token_id", None)
        self.extra_bos = (not self.use_template and bos is not None and not getattr(tokenizer, "add_bos_token", False)
                          and tokenizer("x")["input_ids"][:1] == [bos])

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.end_of_turn is None:
            return super()._render(messages, add_generation_prompt)
        return "".join(m["content"] + ("\n" if m["role"] != "assistant" else self.end_of_turn) for m in messages)


# ---------------------------------------------------------------------------------------------
# character ends of tokens


def token_ends(offsets: Sequence[tuple[int, int]]) -> list[Optional[int]]:
    """Where each token ends, from ``(start, end)`` character offsets; None when the next token
    starts before this one ends (pieces of one multi-byte character share its offsets)."""
    out: list[Optional[int]] = []
    for k, (_, e) in enumerate(offsets):
        nxt = offsets[k + 1][0] if k + 1 < len(offsets) else None
        out.append(e if nxt is None or nxt >= e else None)
    return out


def decode_ends(tok, ids: Sequence[int]) -> tuple[str, list[Optional[int]]]:
    """``(text, ends)`` for any ids (e.g. sampled ones, or a tokenizer without offsets): the text
    is their decoding; a token ends where the decoding of the ids up to it is a prefix of the text
    (a partial multi-byte character decodes to U+FFFD, which is not: None)."""
    ids = [int(i) for i in ids]
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends: list[Optional[int]] = []
    for k in range(len(ids)):
        d = tok.decode(ids[: k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ends.append(len(d) if text.startswith(d) and "\ufffd" not in d[-1:] else None)
    return text, ends


def tokenize_ends(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, offsets)`` of ``text`` without added special tokens (the ids the renderer makes);
    offsets from a fast tokenizer, else from :func:`decode_ends` (then ``start`` = previous end)."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    _, ends = decode_ends(tok, ids)
    offsets, last = [], 0
    for e in ends:  # a token that ends mid-character overlaps the next one
        offsets.append((last, e if e is not None else last + 1))
        last = e if e is not None else last
    return ids, offsets


# ---------------------------------------------------------------------------------------------
# end of turn


def end_of_turn(renderer: Renderer, extra_ids: Sequence[int] = (), text: Optional[str] = None) -> EndOfTurn:
    """How ``renderer``'s tokenizer ends an answer: with ``text`` when given (a template-less model
    whose answers end with it); else the special token its chat template puts right after an
    answer's content (``<|im_end|>``, ``<end_of_turn>``, ...), its EOS, and ``extra_ids`` (e.g. the
    model's generation EOS ids). The first id is the one a student is trained to stop with."""
    tok = renderer.tok
    if text is not None:
        return EndOfTurn(text=text)
    ids: list[int] = []
    if renderer.use_template:
        marker = "Xq7"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            rendered = renderer._render(msgs, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation: fall back to EOS
            rendered = ""
        after = rendered[rendered.find(marker) + len(marker):] if marker in rendered else ""
        special = set(getattr(tok, "all_special_ids", []) or []) | {
            i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        first = tok(after, add_special_tokens=False)["input_ids"][:1] if after else []
        if first and first[0] in special:
            ids.append(int(first[0]))
    for i in [getattr(tok, "eos_token_id", None), *extra_ids]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return EndOfTurn(ids=tuple(ids))


# ---------------------------------------------------------------------------------------------
# encoding with offsets


def _answer(seg_text: str, content: str, seg_ids: list[int], offsets, base: int, eot: EndOfTurn) -> Answer:
    """The content tokens and end-of-turn token of one rendered answer segment (see module docstring)."""
    c0 = seg_text.find(content) if content else -1
    if c0 < 0 and content.strip():
        content = content.strip()
        c0 = seg_text.find(content)
    ans = Answer()
    if c0 < 0:  # the template rewrote the content: nothing to align but the end of turn
        c0, L = len(seg_text), 0
    else:
        L = len(content)
    ends = token_ends(offsets)
    for k, ((s, e), end) in enumerate(zip(offsets, ends)):
        if e - c0 > 0 and s - c0 < L:  # a content token
            ans.positions.append(base + k)
            ans.ends.append(end - c0 if end is not None and end - c0 <= L else None)
    suffix = [k for k, (s, _) in enumerate(offsets) if s - c0 >= L]
    if eot.text is not None:
        p = seg_text.find(eot.text, c0 + L)
        hit = [k for k in suffix if offsets[k][0] <= p < offsets[k][1]] if p >= 0 else []
        ans.eot = base + hit[0] if hit else None
    else:
        hit = [k for k in suffix if seg_ids[k] in eot.ids]
        ans.eot = base + hit[0] if hit else None
    return ans


def encode_aligned(renderer: Renderer, example: Example, eot: EndOfTurn, response: Optional[str] = None) -> dict:
    """:meth:`Renderer.encode` (the same ``input_ids`` and ``labels``: one walk,
    :meth:`Renderer.assemble`) plus ``answers``: one :class:`Answer` per trained assistant turn, in
    order (positions index ``input_ids``)."""
    answers: list[Answer] = []

    def answer_ids(text: str, message: dict, start: int) -> list[int]:
        seg_ids, offsets = tokenize_ends(renderer.tok, text)
        answers.append(_answer(text, message["content"], seg_ids, offsets, start, eot))
        return seg_ids

    ids, labels, shift = renderer.assemble(example, response, answer_ids)
    n = min(len(ids), renderer.max_length)
    return {"input_ids": ids[:n], "labels": labels[:n], "id": example.id,
            "answers": [a.shifted(shift, n) for a in answers]}


def answer_from_ids(tok, ids: Sequence[int], start: int, eot: EndOfTurn) -> tuple[str, Answer]:
    """``(text, Answer)`` for generated ids at positions ``start``, ``start + 1``, ...: the text is
    their decoding without a final end-of-turn token, which (when there) is the answer's ``eot``."""
    ids = [int(i) for i in ids]
    stop = None
    if ids and ((eot.ids and ids[-1] in eot.ids) or (eot.text is not None and tok.decode(ids[-1:]) == eot.text)):
        stop = len(ids) - 1
    body = ids if stop is None else ids[:stop]
    text, ends = decode_ends(tok, body)
    return text, Answer([start + k for k in range(len(body))], ends, start + stop if stop is not None else None)


# ---------------------------------------------------------------------------------------------
# spans


def align(student: Answer, teacher: Answer) -> list[tuple[list[int], list[int]]]:
    """Spans ``(student positions, teacher positions)`` covering the same characters (cut where both
    sides have a token ending), then the two end-of-turn tokens as one span when both have one."""
    common = sorted({e for e in student.ends if e is not None} & {e for e in teacher.ends if e is not None})
    spans: list[tuple[list[int], list[int]]] = []
    i = j = 0
    for b in common:
        i2 = student.ends.index(b, i) + 1
        j2 = teacher.ends.index(b, j) + 1
        spans.append((student.positions[i:i2], teacher.positions[j:j2]))
        i, j = i2, j2
    if student.eot is not None and teacher.eot is not None:
        spans.append(([student.eot], [teacher.eot]))
    return spans
