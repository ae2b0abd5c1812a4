"""Sample, score, select: the pieces shared by the on-policy, self- and preference methods.

* :func:`sample_completions` — batched generation (left padding, KV cache) that returns the
  completion *token ids*, cut after the first end-of-sequence token (EOS kept, what follows dropped).
* :func:`completion_feature` — prompt ids + completion ids -> a training row with the prompt masked.
* :func:`loglik_scores` — mean log-likelihood of each completion under a model (teacher or self).
* :func:`judge_scores` — a model as judge: a rating prompt, scored from the model's next-token
  probabilities of the rating tokens "1".."scale" (the expected rating, in [1, scale]). No text is
  generated, so the score is deterministic and never fails to parse.
* :class:`JsonlStore` — append-only JSONL keyed by id: a rerun after a crash continues where it
  stopped and never redoes a finished item.
* stage bookkeeping (:func:`stage_done`, :func:`mark_done`, :func:`save_model`, :func:`load_saved`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX, Example, collate
from kdistill.generation import hf_model
from kdistill.methods.base import model_label_logprobs

DEFAULT_JUDGE_TEMPLATE = (
    "Question: {prompt}\n\nAnswer: {answer}\n\n"
    "How good is this answer to the question? Rate it from 1 (bad) to {scale} (excellent). "
    "Reply with one number."
)


def completion_feature(prompt_ids: Sequence[int], completion: Sequence[int], row_id=None, max_length: Optional[int] = None) -> dict:
    """A training row: ``input_ids`` = prompt + completion, ``labels`` -100 on the prompt."""
    ids = list(prompt_ids) + list(completion)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "id": row_id}


@torch.no_grad()
def loglik_scores(model: nn.Module, features: list[dict], pad_id: int, vocab_size: int, batch_size: int = 8,
                  device=None) -> list[float]:
    """Mean log-likelihood per completion token of each row under ``model`` (float32)."""
    hf = hf_model(model)
    device = device or next(hf.parameters()).device
    scores: list[float] = []
    for i in range(0, len(features), batch_size):
        b = collate(features[i : i + batch_size], pad_id)
        labels = b["labels"].to(device)
        sums = model_label_logprobs(hf, b["input_ids"].to(device), b["attention_mask"].to(device), labels,
                                    vocab_size).sum(-1)
        counts = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
        scores += (sums / counts).tolist()
    return scores


def rating_token_ids(tokenizer, scale: int) -> list[int]:
    ids = []
    for r in range(1, scale + 1):
        enc = tokenizer(str(r), add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"judge: the rating {r!r} is not a single token for this tokenizer; use scorer: loglik")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def judge_scores(model: nn.Module, tokenizer, renderer, prompts: list[str], answers: list[str], template: str,
                 scale: int = 5, batch_size: int = 8, device=None) -> list[float]:
    """The expected rating ``Σ_r r·p(r)`` the judge gives each answer, in [1, ``scale``].

    The judge prompt (``template`` with ``{prompt}``, ``{answer}``, ``{scale}``) is rendered as a user
    turn with the chat template and a generation prompt; ``p(r)`` is the judge's next-token
    probability of the rating token r, renormalized over the ratings 1..scale.
    """
    hf = hf_model(model)
    device = device or next(hf.parameters()).device
    rating = torch.tensor(rating_token_ids(tokenizer, scale), device=device)
    values = torch.arange(1, scale + 1, dtype=torch.float32, device=device)
    rows = []
    for p, a in zip(prompts, answers):
        text = template.format(prompt=p, answer=a, scale=scale)
        rows.append(renderer.prompt_ids(Example(id="", messages=[{"role": "user", "content": text}], response=None)))
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        b = collate([{"input_ids": r, "labels": r} for r in chunk], tokenizer.pad_token_id)  # right padding
        logits = hf(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                    use_cache=False).logits
        last = torch.tensor([len(r) - 1 for r in chunk], device=device)
        lp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float()[:, rating], dim=-1)
        out += (lp.exp() * values).sum(-1).tolist()
    return out


# ---------------------------------------------------------------------------------------------
# append-only storage and stage bookkeeping


def _state():
    from accelerate import PartialState

    return PartialState()


def on_main(fn: Callable[[], None]) -> None:
    """Run ``fn`` on the main process only, then wait for every process (a stage's files are
    written once, and every process sees them before it goes on)."""
    st = _state()
    if st.is_main_process:
        fn()
    st.wait_for_everyone()


def _read_rows(path: Path, key: str) -> tuple[dict, list[str]]:
    """Rows of a JSONL file by key, and its good lines; a torn line ends the file."""
    rows: dict = {}
    good: list[str] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line: everything after it is rewritten
            rows[row[key]] = row
            good.append(line)
    return rows, good


class JsonlStore:
    """An append-only JSONL file of rows keyed by ``key`` (default ``id``).

    A line cut off by a crash is dropped on open; rows are flushed and fsynced per batch, so a
    rerun continues with the items not yet written and never repeats one.

    Under several processes, :meth:`fill` shares the missing items out (process r takes every
    world-th one) and each process appends to its own ``<file>.part-r``; the main process then
    merges the parts into the file, and every process returns all rows. Parts left by a crash are
    merged when the store is next opened.
    """

    def __init__(self, path: Path, key: str = "id"):
        self.path = Path(path)
        self.key = key
        st = _state()
        self.world, self.rank = st.num_processes, st.process_index
        on_main(self._consolidate)
        self.rows, _ = _read_rows(self.path, key)

    def _part(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part-{rank}")

    def _consolidate(self) -> None:
        """(main process) Torn lines dropped, leftover parts merged into the file and removed."""
        rows, good = _read_rows(self.path, self.key)
        parts = sorted(self.path.parent.glob(f"{self.path.name}.part-*")) if self.path.parent.is_dir() else []
        for part in parts:
            for line in _read_rows(part, self.key)[1]:
                k = json.loads(line)[self.key]
                if k not in rows:
                    rows[k] = None
                    good.append(line)
        if self.path.is_file() or parts:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(g + "\n" for g in good), encoding="utf-8")
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            tmp.replace(self.path)
        for part in parts:
            part.unlink()

    def __contains__(self, k) -> bool:
        return k in self.rows

    def append(self, rows: list[dict], path: Optional[Path] = None) -> None:
        path = path or self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
                self.rows[r[self.key]] = r
            fh.flush()
            os.fsync(fh.fileno())

    def fill(self, items: list, key_of: Callable, make: Callable[[list], list[dict]], batch_size: int,
             desc: Optional[str] = None, allow_missing: bool = False) -> list[dict]:
        """Run ``make`` on the items not stored yet, ``batch_size`` at a time; all rows in item order.

        With ``desc``, a progress bar (main process) counts done/total items. ``allow_missing``:
        ``make`` may return no row for an item (e.g. a failed request): it is left out of the
        result and made again on the next fill.
        """
        todo = [it for it in items if key_of(it) not in self.rows]
        mine = todo[self.rank :: self.world]
        target = self.path if self.world == 1 else self._part(self.rank)
        bar = None
        if desc is not None and todo and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="prompt", dynamic_ncols=True)
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            self.append(make(chunk), target)
            if bar is not None:
                bar.update(min(len(chunk) * self.world, bar.total - bar.n))
        if bar is not None:
            bar.close()
        if self.world > 1:
            _state().wait_for_everyone()
            on_main(self._consolidate)
            self.rows, _ = _read_rows(self.path, self.key)
        if allow_missing:
            return [self.rows[key_of(it)] for it in items if key_of(it) in self.rows]
        return [self.rows[key_of(it)] for it in items]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write a whole file atomically (tmp + rename), once (main process); every process waits."""
    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)

    on_main(write)


def write_json(path: Path, value) -> None:
    """Write a JSON file atomically, once (main process); every process waits."""
    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(value, indent=2))
        tmp.replace(path)

    on_main(write)


def stage_done(stage_dir: Path) -> Optional[dict]:
    """The summary a finished stage left in ``done.json``, or None."""
    p = Path(stage_dir) / "done.json"
    return json.loads(p.read_text()) if p.is_file() else None


def mark_done(stage_dir: Path, summary: dict) -> None:
    """The stage is finished: ``done.json`` with its summary (main process; every process waits)."""
    write_json(Path(stage_dir) / "done.json", summary)


def save_model(model: nn.Module, folder: Path) -> None:
    """Save a stage's model (main process; every process waits, then may :func:`load_saved` it)."""
    on_main(lambda: hf_model(model).save_pretrained(str(folder)))


def load_saved(like: nn.Module, folder: Path) -> nn.Module:
    """A model saved by :func:`save_model`, same class, dtype and device as ``like``."""
    p = next(like.parameters())
    model = type(like).from_pretrained(str(folder), dtype=p.dtype)
    return model.to(p.device).eval()
