"""Rows -> token ids with the prompt masked.

A row is one JSON object per line, either::

    {"id": "optional", "prompt": "...", "response": "...", "reference": "optional ground truth"}
    {"id": "optional", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}

With ``messages``, every assistant turn is trained on (except one marked ``"train": false``: context
only, e.g. a few-shot example) and the last assistant turn is the
"response" (a conversation ending on a user turn is a prompt only). ``reference`` (optional)
is the ground-truth answer used for task accuracy; without it, task accuracy is not measured.

Rows are rendered with the tokenizer's chat template when it has one, else as
``prompt + response + eos``. Labels are -100 on prompt and padding tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from kdistill.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Example:
    """One row: the conversation up to the response, the response, and an optional reference."""

    id: str
    messages: list[dict]  # the conversation before the (last) response; ends on a user turn
    response: Optional[str]  # the last assistant turn (None for prompt-only rows)
    reference: Optional[str] = None
    history: list[dict] = field(default_factory=list)  # full conversation when it has several assistant turns
    extra: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""

    def conversation(self) -> list[dict]:
        """Full conversation including the response."""
        if self.history:
            return self.history
        msgs = list(self.messages)
        if self.response is not None:
            msgs.append({"role": "assistant", "content": self.response})
        return msgs


def stable_id(content: Any) -> str:
    """An id derived from a row's content: the same prompt always gets the same id."""
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def parse_row(row: Any, where: str, require_response: bool = True) -> Example:
    """Validate one decoded JSON row. ``where`` is ``file:line`` for error messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str):
        reference = str(reference)
    extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "response", "messages", "reference", "system")}
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and string 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}].role must be system, user or assistant, got {m['role']!r}")
            if m.get("train", True) is not True and (m["role"] != "assistant" or m["train"] is not False):
                raise DataError(f"{where}: messages[{i}].train: only an assistant turn may say \"train\": false")
        # an assistant turn with "train": false is context only (e.g. a few-shot example): never trained on
        msgs = [{"role": m["role"], "content": m["content"], **({"train": False} if m.get("train") is False else {})}
                for m in msgs]
        if msgs[-1]["role"] == "assistant":
            before, response = msgs[:-1], msgs[-1]["content"]
            if row.get("response") is not None and row["response"] != response:
                raise DataError(f"{where}: two different responses ('messages' ends on an assistant turn and "
                                "'response' says otherwise): keep one")
        else:  # the answer to the last user turn, if any, may be given as 'response'
            before, response = msgs, row.get("response")
            if response is not None and not isinstance(response, str):
                raise DataError(f"{where}: 'response' must be a string")
        if not any(m["role"] == "user" for m in before):
            raise DataError(f"{where}: 'messages' has no user turn before the response")
        history = msgs if sum(m["role"] == "assistant" for m in msgs) > 1 else []
        ex = Example(id="", messages=before, response=response, reference=reference, history=history, extra=extra)
        content = msgs
    elif "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string")
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise DataError(f"{where}: 'response' must be a string")
        messages = [{"role": "user", "content": row["prompt"]}]
        if isinstance(row.get("system"), str):
            messages.insert(0, {"role": "system", "content": row["system"]})
        ex = Example(id="", messages=messages, response=response, reference=reference, extra=extra)
        content = [row["prompt"], response]
    else:
        raise DataError(f"{where}: row has neither 'prompt' nor 'messages' (expected {{\"prompt\", \"response\"}})")
    if require_response and ex.response is None:
        raise DataError(f"{where}: row has no response (expected 'response', or 'messages' ending on an assistant turn)")
    ex.id = str(row["id"]) if row.get("id") is not None else stable_id(content)
    return ex


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def jsonl_lines(path: str | Path) -> Iterable[tuple[int, Any, Optional[str]]]:
    """The one input policy for JSONL files: ``(line number, decoded object or None, problem or None)``.

    A UTF-8 byte-order mark is dropped; a line that is not valid UTF-8, not valid JSON, or holds a
    lone surrogate (``"\\ud800"``: text no tokenizer can encode) is a problem named with its line.
    Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, None, f"not valid JSON ({exc.msg})"
                continue
            if _has_lone_surrogate(obj):
                yield lineno, None, "a string holds a lone surrogate (an unpaired \\ud800-\\udfff escape)"
                continue
            yield lineno, obj, None


def read_jsonl(path: str | Path) -> Iterable[tuple[int, Any]]:
    """Yield ``(line_number, decoded_object)``; a bad line raises DataError naming file and line."""
    for lineno, obj, problem in jsonl_lines(path):
        if problem is not None:
            raise DataError(f"{path}:{lineno}: {problem}")
        yield lineno, obj


def load_examples(path: str | Path, require_response: bool = True) -> list[Example]:
    """Read and validate every row of a JSONL file; empty files and duplicate ids are errors."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl(path):
        ex = parse_row(row, f"{path}:{lineno}", require_response=require_response)
        if ex.id in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {ex.id!r} (first at line {seen[ex.id]})")
        seen[ex.id] = lineno
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no rows (expected JSONL with one {{\"prompt\", \"response\"}} object per line)")
    return examples


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split by id hash (stable when rows are added or reordered)."""
    scored = sorted(examples, key=lambda e: hashlib.sha1(f"{seed}:{e.id}".encode()).hexdigest())
    n_eval = max(1, int(round(len(examples) * fraction)))
    if n_eval >= len(examples):
        raise DataError(f"only {len(examples)} rows: too few to hold out an eval split (set data.eval)")
    held = {e.id for e in scored[:n_eval]}
    return [e for e in examples if e.id not in held], [e for e in examples if e.id in held]


def tag_task(examples: list[Example], task: str) -> list[Example]:
    """The rows of one task: ids prefixed ``task/``, ``extra["task"]`` set."""
    return [dataclasses.replace(e, id=f"{task}/{e.id}", extra={**e.extra, "task": task}) for e in examples]


def task_of(example: Example) -> Optional[str]:
    return example.extra.get("task")


def mix_tasks(rows: list[Example], weights: dict[str, float], seed: int) -> tuple[list[Example], dict]:
    """Training rows resampled so each task holds ``weight / Σ weights`` of them (the total stays).

    A task below its share is repeated (whole copies, then a seeded sample; copies get ids
    ``ID~2``, ``ID~3``, ...), a task above it is subsampled (seeded). Returns the rows and, per
    task, ``{"rows": available, "used": in the mixture}``.
    """
    by_task: dict[str, list[Example]] = {}
    for e in rows:
        by_task.setdefault(task_of(e), []).append(e)
    total = len(rows)
    wsum = sum(weights[t] for t in by_task)
    out: list[Example] = []
    stats = {}
    for t, items in by_task.items():
        want = max(1, round(total * weights[t] / wsum))
        reps, rest = divmod(want, len(items))
        chosen = [(e, k) for k in range(reps) for e in items]
        extra = random.Random(f"{seed}:{t}").sample(items, rest)
        chosen += [(e, reps) for e in extra]
        out += [e if k == 0 else dataclasses.replace(e, id=f"{e.id}~{k + 1}") for e, k in chosen]
        stats[t] = {"rows": len(items), "used": want, "share": round(weights[t] / wsum, 4)}
    return out, stats


# ---------------------------------------------------------------------------------------------
# rendering and tokenization


class Renderer:
    """Turns conversations into token ids, with a chat template when the tokenizer has one."""

    # without a template, put BOS in front even when the tokenizer's add_bos_token is off (a subclass
    # sets it for a tokenizer that adds BOS to plain text by itself: kdistill.alignment.TurnRenderer)
    extra_bos: bool = False

    def __init__(self, tokenizer, max_length: int, system_prompt: Optional[str] = None, chat_template: bool = True):
        self.tok = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.truncated = 0

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.use_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        text = "".join(
            (m["content"] + "\n" if m["role"] != "assistant" else m["content"] + (self.tok.eos_token or "") + "\n")
            for m in messages
        )
        return text

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, example: Example) -> list[int]:
        """Token ids of the prompt, ending where the model should start answering."""
        msgs = self._with_system(example.messages)
        if self.use_template:
            ids = self._ids(self._render(msgs, add_generation_prompt=True))
        else:
            ids = self._ids("".join(m["content"] + "\n" for m in msgs))
        if self._bos() is not None:
            ids = [self._bos()] + ids
        return ids[-self.max_length:]

    def encode(self, example: Example, response: Optional[str] = None) -> dict:
        """``{"input_ids", "labels"}`` with -100 on everything but assistant tokens.

        Each assistant turn is located by rendering the conversation up to it (with a generation
        prompt) and up to its end; the difference is trained on. ``response`` replaces the row's
        response (e.g. with a teacher's answer).
        """
        ids, labels, _ = self.assemble(example, response, lambda text, message, start: self._ids(text))
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": ids, "labels": labels, "id": example.id}

    def assemble(self, example: Example, response: Optional[str],
                 answer_ids: Callable[[str, dict, int], list[int]]) -> tuple[list[int], list[int], int]:
        """``(input_ids, labels, bos)`` of a row before truncation; ``bos`` is 1 when a BOS was put in
        front (positions after it moved by one). ``answer_ids(text, message, start)`` tokenizes each
        trained answer segment (``text``: the rendered segment of assistant ``message``, whose first
        token lands at position ``start`` before the BOS); assistant turns marked ``"train": false``
        stay prompt (context, never trained on). One walk for :meth:`encode` and
        :func:`kdistill.alignment.encode_aligned`."""
        conv = self._with_system(example.conversation())
        if response is not None:
            conv = self._with_system(example.messages) + [{"role": "assistant", "content": response}]
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for i, m in enumerate(conv):
            if m["role"] != "assistant" or m.get("train") is False:
                continue
            before = self._render(conv[:i], add_generation_prompt=True)
            upto = self._render(conv[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not upto.startswith(before):
                raise DataError(f"row {example.id}: the chat template does not render conversations as prefixes")
            seg_prompt = self._ids(before[len(done):])
            seg_answer = answer_ids(upto[len(before):], m, len(ids) + len(seg_prompt))
            ids += seg_prompt + seg_answer
            labels += [IGNORE_INDEX] * len(seg_prompt) + list(seg_answer)
            done = upto
        if self.use_template:
            tail = self._render(conv, add_generation_prompt=False)[len(done):]
            if tail:
                t = self._ids(tail)
                ids += t
                labels += [IGNORE_INDEX] * len(t)
        if self._bos() is not None:
            return [self._bos()] + ids, [IGNORE_INDEX] + labels, 1
        return ids, labels, 0

    def _bos(self) -> Optional[int]:
        """The BOS id put in front of a template-less rendering, or None (a template writes its own)."""
        bos = getattr(self.tok, "bos_token_id", None)
        if self.use_template or bos is None:
            return None
        return bos if (getattr(self.tok, "add_bos_token", False) or self.extra_bos) else None


def renderer_for(cfg, tokenizer) -> Renderer:
    """The renderer a run uses for ``tokenizer``: ``data.max_length``, ``system_prompt``, ``chat_template``."""
    return Renderer(tokenizer, cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template)


def encode_examples(renderer: Renderer, examples: list[Example], drop_empty: bool = True) -> tuple[list[dict], int]:
    """Encode rows; returns ``(features, n_without_trainable_tokens)``.

    Rows whose response was cut off entirely by ``max_length`` have nothing to train on: they are
    counted and skipped (the count is logged), never silently dropped.
    """
    out, empty = [], 0
    for ex in examples:
        f = renderer.encode(ex)
        if all(l == IGNORE_INDEX for l in f["labels"]):
            empty += 1
            if drop_empty:
                continue
        out.append(f)
    return out, empty


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded rows into a batch.

    Returns ``input_ids`` and ``attention_mask`` ``[batch, seq]``, and ``labels`` ``[batch, seq]``
    *aligned with the next-token logits*: ``labels[b, t]`` is the token at position t+1 (what the
    logits at t predict), -100 where that token is prompt, padding or past the end. Every loss in
    kdistill takes labels in this form. ``ids`` (list of row ids) is kept for cached teachers.
    """
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, : n - 1] = torch.tensor(f["labels"][1:])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "ids": [f.get("id") for f in features]}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation: ``input_ids``/``attention_mask`` ``[batch, seq]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def completion_feature(prompt_ids: Sequence[int], completion: Sequence[int], row_id=None, max_length: Optional[int] = None) -> dict:
    """A training row: ``input_ids`` = prompt + completion, ``labels`` -100 on the prompt."""
    ids = list(prompt_ids) + list(completion)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "id": row_id}
