"""Teacher answers: a teacher answers prompts -> an append-only, resumable JSONL.

The job behind ``kdistill generate`` (:mod:`kdistill.commands.generate`) and behind a ``generate:``
section in a ``method: sequence`` run.

Input rows (``generate.prompts``): ``{"id"?: str, "prompt": str}`` or ``{"id"?, "messages": [...]}``
(other fields such as ``reference`` are carried over to the output). A bad line is reported with
its line number and skipped; the other lines are still answered.

Output rows (``generate.output``, default ``OUTPUT_DIR/teacher.jsonl``), one per answered sample::

    {"id", "prompt_id", "sample", "prompt" | "messages", "response", "finish_reason", "teacher",
     "sampling": {"temperature", "top_p", "max_new_tokens", "style"}, ["system"], ["rationale", "answer"], ...}

Ids are stable: the row's ``id``, or a hash of its content (:func:`kdistill.data.stable_id`, the
same id ``kdistill run`` gives the row); with ``samples_per_prompt > 1`` each sample is
``ID#K``. These rows are valid ``data.train`` rows for ``kdistill run`` as they are.

Crash safety (``kill -9`` at any moment, then the same command again):

* each answer is appended as one ``write`` of one complete line, as soon as it arrives;
* on start, the file is read back; a torn last line (no newline, or not JSON) is cut off and
  any corrupt or duplicate line dropped, so every id appears once;
* only ids not in the file are requested: no answered prompt is ever sent again;
* failures (after retries) go to ``OUTPUT.failures.jsonl``, never to the output; a rerun retries
  them. ``OUTPUT.meta.json`` records the settings; resuming with other settings is an error;
* one writer at a time: ``OUTPUT.lock`` is held (``flock``) while a job runs, so two processes
  cannot answer the same prompts twice; the OS releases it when the process dies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from pydantic import Field

from kdistill.data import Example, Renderer, jsonl_lines, parse_row
from kdistill.errors import ConfigError, DataError
from kdistill.models import load_model, load_tokenizer, resolve_source
from kdistill.section import Section
from kdistill.sampling import sample_texts
from kdistill.store import exclusive, read_json, read_jsonl_rows, write_json
from kdistill.teachers.api import ApiTeacher, Job
from kdistill.vllm_engine import build_llm

log = logging.getLogger("kdistill")

class GenerateConfig(Section):
    """``kdistill generate``: the teacher answers prompts -> an append-only, resumable JSONL."""

    prompts: Optional[str] = Field(None, description="JSONL of {id?, prompt} or {id?, messages}; in `run`: default data.train")
    output: Optional[str] = Field(None, description="output JSONL (default: OUTPUT_DIR/teacher.jsonl)")
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_new_tokens: int = Field(512, ge=1)
    style: Literal["plain", "explain", "rationale"] = Field(
        "plain", description="explain: Orca-style step-by-step system message; rationale: rationale + final answer, stored apart"
    )
    system_prompt: Optional[str] = Field(None, description="replaces the style's system message")
    batch_size: int = Field(8, ge=1, description="prompts per batch for a local teacher")
    seed: int = 0


#: Orca-style system messages ("Orca: Progressive Learning from Complex Explanation Traces", Mukherjee et al. 2023).
EXPLAIN_SYSTEM = (
    "You are an AI assistant. The user will give you a task. Your goal is to complete the task as faithfully as you "
    "can. While performing the task, think step by step and justify your steps. Explain your reasoning so that a "
    "student could follow it, then give the answer."
)
#: Distilling step-by-step (Hsieh et al. 2023): a rationale, then the final answer on its own line.
RATIONALE_SYSTEM = (
    "Answer the user's question. First explain your reasoning step by step on lines that start after 'Rationale:'. "
    "Then give only the final answer on a last line that starts with 'Answer:'."
)

_ANSWER_RE = re.compile(r"(?im)^[ \t>*#]*(?:final[ \t]+)?answer[ \t]*\**[ \t]*[:：]\**")
_RATIONALE_RE = re.compile(r"(?is)^[ \t>*#]*rationale[ \t]*\**[ \t]*[:：]\**")


def split_rationale(text: str) -> tuple[Optional[str], Optional[str]]:
    """``(rationale, answer)`` from a ``Rationale: ... Answer: ...`` text; answer None when absent."""
    marks = list(_ANSWER_RE.finditer(text))
    if not marks:
        return text.strip() or None, None
    last = marks[-1]
    rationale = _RATIONALE_RE.sub("", text[: last.start()].strip(), count=1).strip()
    answer = text[last.end():].strip()
    return rationale or None, answer or None


def style_system(style: str, override: Optional[str] = None) -> Optional[str]:
    if override is not None:
        return override
    return {"plain": None, "explain": EXPLAIN_SYSTEM, "rationale": RATIONALE_SYSTEM}[style]


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompt:
    id: str
    row: dict  # the input row (for carrying fields over)
    messages: list[dict]  # what is sent (without the style's system message)


@dataclass
class PromptFile:
    prompts: list[Prompt]
    bad_lines: list[str] = field(default_factory=list)  # "file:line: why"
    duplicates: int = 0


def read_prompts(path: str | Path) -> PromptFile:
    """Read a prompts JSONL; bad lines are collected (with line numbers), not fatal."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"generate.prompts: file not found: {path}")
    out = PromptFile([])
    seen: set[str] = set()
    for lineno, row, problem in jsonl_lines(path):  # the same input policy as `kdistill run`
        where = f"{path}:{lineno}"
        if problem is not None:
            out.bad_lines.append(f"{where}: {problem}")
            continue
        try:  # a conversation ending on an assistant turn: that turn is answered anew
            ex = parse_row(row, where, require_response=False)
        except DataError as exc:
            out.bad_lines.append(str(exc))
            continue
        if ex.id in seen:
            out.duplicates += 1
            continue
        seen.add(ex.id)
        out.prompts.append(Prompt(ex.id, row, ex.messages))
    return out


# ---------------------------------------------------------------------------------------------
# the output file


def load_done(path: Path) -> tuple[dict[str, dict], int]:
    """Rows already in ``path`` by id, repairing the file: returns ``(rows, n_lines_dropped)``.

    A torn last line (killed mid-write), a corrupt line or a repeated id is dropped and the file
    rewritten atomically without it (:func:`kdistill.store.read_jsonl_rows`).
    """
    done, dropped = read_jsonl_rows(path, "id", valid=lambda row: isinstance(row.get("response"), str))
    if dropped:
        log.warning("%s: dropped %d torn, corrupt or duplicate line(s) left by an interrupted run", path, dropped)
    return done, dropped


class Appender:
    """Appends whole lines to a file with one ``os.write`` each (O_APPEND)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = None


# ---------------------------------------------------------------------------------------------
# the job


@dataclass
class Task:
    id: str
    prompt: Prompt
    sample: int
    messages: list[dict]  # what is sent, the style's system message included


def _output_path(cfg) -> Path:
    g = cfg.generate
    return Path(g.output) if g.output else Path(cfg.output_dir) / "teacher.jsonl"


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + suffix)


def teacher_name(cfg) -> str:
    if cfg.teacher.api is not None:
        return f"api:{cfg.teacher.api.model}"
    return str(cfg.teacher.model)


def _settings(cfg, teacher: str) -> dict:
    g = cfg.generate
    return {"teacher": teacher, "style": g.style, "system_prompt": style_system(g.style, g.system_prompt),
            "temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens,
            "per_sample_ids": g.samples_per_prompt > 1}


def _check_meta(out: Path, settings: dict, have_rows: bool) -> None:
    """Resuming ``out`` with other settings is an error; an unreadable (torn) meta file is rewritten."""
    meta = _sidecar(out, ".meta.json")
    old = read_json(meta) if meta.is_file() and have_rows else None
    if isinstance(old, dict):
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"generate.output: {out} holds answers made with {k}={old.get(k)!r}, not {settings[k]!r}; "
                "use another generate.output (or delete the file) to start over"
            )
    write_json(meta, settings, main_only=False)


def _tasks(prompts: list[Prompt], cfg, system: Optional[str]) -> list[Task]:
    g = cfg.generate
    tasks = []
    for p in prompts:
        msgs = list(p.messages)
        if system is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        for k in range(g.samples_per_prompt):
            tid = p.id if g.samples_per_prompt == 1 else f"{p.id}#{k}"
            tasks.append(Task(tid, p, k, msgs))
    return tasks


_RESERVED = {"id", "prompt", "messages", "response", "finish_reason", "teacher", "sampling", "prompt_id", "sample",
             "rationale", "answer", "system"}


def make_row(task: Task, text: str, finish_reason: Optional[str], cfg, teacher: str, system: Optional[str]) -> dict:
    g = cfg.generate
    src = task.prompt.row
    row: dict = {"id": task.id, "prompt_id": task.prompt.id, "sample": task.sample}
    if "messages" in src:
        msgs = list(task.prompt.messages)
        if g.style == "explain" and system is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        row["messages"] = msgs + [{"role": "assistant", "content": text}]
    else:
        row["prompt"] = src["prompt"]
        if isinstance(src.get("system"), str):
            row["system"] = src["system"]
        elif g.style == "explain" and system is not None:
            row["system"] = system  # Orca: the student trains with the system message it was answered under
    row["response"] = text
    row["finish_reason"] = finish_reason
    row["teacher"] = teacher
    row["sampling"] = {"temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens,
                       "style": g.style, "seed": g.seed}
    if g.style == "rationale":
        row["rationale"], row["answer"] = split_rationale(text)
    for k, v in src.items():
        if k not in _RESERVED and k not in row:
            row[k] = v
    return row


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.t0 = time.time()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="generate", unit="row", dynamic_ncols=True)

    def update(self, requests: int, failed: int) -> None:
        if self.bar is not None:
            rate = requests / max(time.time() - self.t0, 1e-6)
            self.bar.set_postfix_str(f"{rate:.3g} req/s, {failed} failed", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(cfg, say: Callable[[str], None] = log.info, progress: bool = True, local=None) -> dict:
    """Run (or resume) the generation job of ``cfg.generate``; returns a summary dict.

    ``local``: an already loaded ``(model, tokenizer)`` for a local teacher (else loaded here).
    Raises :class:`~kdistill.errors.ApiError` (a KDistillError) on a fatal endpoint problem;
    everything answered before it is kept.
    """
    g = cfg.generate
    if g is None:
        raise ConfigError("generate: required key is missing (prompts, output, ...)")
    prompts_path = g.prompts or (cfg.data.train if cfg.data is not None else None)
    if prompts_path is None:
        raise ConfigError("generate.prompts: required key is missing (a JSONL of {id?, prompt} or {id?, messages} rows)")
    if cfg.teacher.api is None and cfg.teacher.model is None:
        raise ConfigError("teacher: set teacher.api (an OpenAI-compatible endpoint) or teacher.model (a local model)")
    out = _output_path(cfg)
    teacher = teacher_name(cfg)
    system = style_system(g.style, g.system_prompt)

    pf = read_prompts(prompts_path)
    for msg in pf.bad_lines[:20]:
        say(f"skipping bad prompt line: {msg}")
    if len(pf.bad_lines) > 20:
        say(f"... and {len(pf.bad_lines) - 20} more bad lines")
    if pf.duplicates:
        say(f"{pf.duplicates} prompt(s) repeat an earlier id and are skipped")
    if not pf.prompts:
        raise DataError(f"{prompts_path}: no usable prompt rows")

    with exclusive(_sidecar(out, ".lock"), str(out), "generate.output"):  # one writer per output file
        done, dropped = load_done(out)
        _check_meta(out, _settings(cfg, teacher), bool(done))
        tasks = _tasks(pf.prompts, cfg, system)
        todo = [t for t in tasks if t.id not in done]
        n_done = len(tasks) - len(todo)
        say(f"generate: {len(tasks)} rows ({len(pf.prompts)} prompts x {g.samples_per_prompt}); "
            f"{n_done} already in {out}, {len(todo)} to do; teacher {teacher}")

        summary = {"output": str(out), "total": len(tasks), "already_done": n_done, "succeeded": 0, "failed": 0,
                   "retried": 0, "requests": 0, "bad_prompt_lines": len(pf.bad_lines), "duplicate_prompts": pf.duplicates,
                   "torn_lines_dropped": dropped, "teacher": teacher}
        if not todo:
            summary["complete"] = True
            return summary

        writer = Appender(out)
        fails: list = []  # the failures file, opened on the first failure
        bar = _Progress(len(tasks), n_done, progress)
        t0 = time.time()
        requests = [0]

        def on_result(task: Task, text: Optional[str], finish: Optional[str], error: Optional[str], n_req: int) -> None:
            requests[0] += n_req
            if text is None:
                summary["failed"] += 1
                if not fails:
                    fails.append(Appender(_sidecar(out, ".failures.jsonl")))
                fails[0].write({"id": task.id, "error": error, "attempts": n_req, "time": round(time.time(), 3)})
            else:
                writer.write(make_row(task, text, finish, cfg, teacher, system))
                summary["succeeded"] += 1
            bar.update(requests[0], summary["failed"])

        try:
            if cfg.teacher.api is not None:
                _run_api(cfg, todo, on_result, summary)
            elif cfg.teacher.engine == "vllm":
                _run_vllm(cfg, todo, on_result)
            else:
                _run_local(cfg, todo, on_result, local)
        finally:
            bar.close()
            writer.close()
            for f in fails:
                f.close()
            summary["seconds"] = round(time.time() - t0, 2)
            summary["requests"] = max(summary["requests"], requests[0])
            summary["complete"] = summary["already_done"] + summary["succeeded"] == summary["total"]
            write_json(_sidecar(out, ".summary.json"), summary, main_only=False)
        rate = summary["requests"] / max(summary["seconds"], 1e-6)
        say(f"generate: {summary['succeeded']} answered, {summary['failed']} failed, {summary['retried']} retries, "
            f"{summary['requests']} requests ({rate:.3g}/s) in {summary['seconds']:.1f} s -> {out}"
            + ("" if summary["complete"] else "; rerun the same command to retry the failed prompts"))
        return summary


def _run_api(cfg, todo: list[Task], on_result, summary: dict) -> None:
    g = cfg.generate
    api = ApiTeacher(cfg.teacher.api)
    jobs = (Job(t, t.messages, g.temperature, g.max_new_tokens, g.top_p) for t in todo)
    try:
        api.run(jobs, lambda job, c: on_result(job.key, c.text, c.finish_reason, c.error, c.attempts))
    finally:
        summary["retried"] = api.stats["retries"]
        summary["requests"] = api.stats["requests"]
        summary["failure_reasons"] = dict(api.errors)


def _run_local(cfg, todo: list[Task], on_result, local=None) -> None:
    """A local transformers model: batched generation with a KV cache, one batch written at a time."""
    g = cfg.generate
    if local is None:
        local = load_model(cfg.teacher.model, "teacher.model", cfg.teacher.dtype, cfg.teacher.revision,
                           cfg.teacher.trust_remote_code)
    model, tok = local
    renderer = Renderer(tok, max_length=10**9, chat_template=cfg.data.chat_template)
    torch.manual_seed(g.seed)
    for i in range(0, len(todo), g.batch_size):
        chunk = todo[i : i + g.batch_size]
        ids = [renderer.prompt_ids(Example(t.id, t.messages, None)) for t in chunk]
        reasons: list[str] = []
        texts = sample_texts(model, tok, ids, g.max_new_tokens, g.batch_size, do_sample=g.temperature > 0,
                            temperature=max(g.temperature, 1e-5), finish_reasons=reasons)
        for t, text, why in zip(chunk, texts, reasons):
            if text.strip():
                on_result(t, text, why, None, 1)
            else:
                on_result(t, None, None, "empty response", 1)


def _run_vllm(cfg, todo: list[Task], on_result) -> None:
    """vLLM's offline engine (``teacher.engine: vllm``, settings in ``vllm:``; an optional extra, GPU).

    Prompts are rendered exactly as for ``engine: transformers`` (kdistill's renderer, honouring
    ``data.chat_template``) and given to vLLM as token ids.
    """
    from vllm import SamplingParams

    g = cfg.generate
    tok = load_tokenizer(cfg.teacher.model, "teacher.model", cfg.teacher.revision, cfg.teacher.trust_remote_code)
    renderer = Renderer(tok, max_length=10**9, chat_template=cfg.data.chat_template)
    llm = build_llm(resolve_source(cfg.teacher.model), cfg.vllm, "teacher.engine", seed=g.seed,
                    trust_remote_code=cfg.teacher.trust_remote_code, revision=cfg.teacher.revision)
    params = SamplingParams(temperature=g.temperature, top_p=g.top_p or 1.0, max_tokens=g.max_new_tokens)
    step = max(g.batch_size, 256)  # vLLM schedules the batch itself; chunks only bound what a crash loses
    for i in range(0, len(todo), step):
        chunk = todo[i : i + step]
        prompts = [{"prompt_token_ids": renderer.prompt_ids(Example(t.id, t.messages, None))} for t in chunk]
        outs = llm.generate(prompts, params, use_tqdm=False)
        for t, o in zip(chunk, outs):
            c = o.outputs[0]
            text = tok.decode(list(c.token_ids), skip_special_tokens=True) if not c.text else c.text
            if text.strip():
                on_result(t, text, c.finish_reason, None, 1)
            else:
                on_result(t, None, None, "empty response", 1)
