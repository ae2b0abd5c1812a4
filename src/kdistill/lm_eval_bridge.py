"""Standard benchmarks through EleutherAI's lm-evaluation-harness (``eval.benchmarks``).

kdistill does not reimplement a benchmark: every task runs through lm-eval's Python API
(``lm_eval.simple_evaluate``) with lm-eval's own model wrappers and metrics —

* a local model (teacher, initial student, trained student): ``lm_eval.models.huggingface.HFLM``
  around the model already in memory;
* an API teacher: lm-eval's OpenAI-compatible chat model (``local-chat-completions``), which can
  only generate: log-likelihood tasks (multiple choice, perplexity) are listed as not measurable.

Tasks are hub task names (``arc_easy``, ``gsm8k``...) or local task YAMLs in ``include_path``
(e.g. ``dataset_path: json`` over local JSONL files), which is how tests run without a hub.

Each (model fingerprint, task, settings) result is kept in ``OUTPUT/benchmarks/`` with
:func:`kdistill.store.memo_json`: a repeated or interrupted evaluation reruns only unfinished tasks.
The fingerprint hashes the model's weights and tokenizer, so a changed model is never served an
old result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from kdistill.errors import ConfigError, KDistillError, ModelError
from kdistill.models import tokenizer_fingerprint
from kdistill.store import memo_json

class BenchmarkError(ModelError):
    """lm-eval could not run a task (a bad task file, a failing server): one line, exit status 2."""


NOT_A_METRIC = {"alias", "name", "sample_len", "sample_count", " "}


def model_fingerprint(model, tokenizer) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, bytes) and of the tokenizer."""
    h = hashlib.blake2b(digest_size=12)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _files_hash(folder: Optional[str]) -> str:
    """A hash of every file under ``include_path`` (an edited task YAML or data file is a new result)."""
    if folder is None:
        return ""
    h = hashlib.sha1()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def metric_values(entry: dict) -> dict:
    """lm-eval's ``results[task]`` -> ``{metric: float}`` (``acc,none`` -> ``acc``; another filter
    than ``none`` is kept as ``metric (filter)``; stderr and labels dropped)."""
    out = {}
    for key, v in entry.items():
        if key in NOT_A_METRIC or "_stderr" in key or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric} ({filt})"] = round(float(v), 6)
    return out


class Benchmarks:
    """Runs ``eval.benchmarks`` for one model at a time; results kept per task under ``folder``."""

    def __init__(self, bcfg, folder: Path, say: Callable[[str], None] = print):
        self.bcfg, self.folder, self.say = bcfg, Path(folder), say
        if bcfg.include_path is not None and not Path(bcfg.include_path).is_dir():
            raise ConfigError(f"eval.benchmarks.include_path: folder not found: {bcfg.include_path}")
        self._tm = None
        self.higher: dict[str, dict[str, bool]] = {}  # task -> metric -> higher is better
        self.files = _files_hash(bcfg.include_path)

    def _lm_eval(self):
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError("eval.benchmarks: needs lm-evaluation-harness: pip install 'kdistill[benchmarks]' "
                              "(lm-eval)") from None
        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            import datasets

            datasets.disable_progress_bars()
        except Exception:  # noqa: BLE001
            pass
        return lm_eval

    def task_manager(self):
        """lm-eval's task index: only ``include_path`` when every task is there (fast), else lm-eval's own too."""
        if self._tm is None:
            self._lm_eval()
            from lm_eval.tasks import TaskManager

            names = [t.name for t in self.bcfg.task_list()]
            tm = None
            if self.bcfg.include_path is not None:
                tm = TaskManager(include_path=self.bcfg.include_path, include_defaults=False)
                if not all(n in tm.all_tasks for n in names):
                    tm = None
            tm = tm or TaskManager(include_path=self.bcfg.include_path)
            unknown = [n for n in names if n not in tm.all_tasks]
            if unknown:
                where = f" or in {self.bcfg.include_path}" if self.bcfg.include_path else ""
                raise ConfigError(f"eval.benchmarks.tasks: unknown lm-eval task {unknown[0]!r} (not in lm-eval's "
                                  f"task list{where}; local tasks need eval.benchmarks.include_path)")
            self._tm = tm
        return self._tm

    def _settings(self, task: str, kind: str) -> str:
        b = self.bcfg
        key = {"task": task, "kind": kind, "fewshot": b.num_fewshot, "limit": b.limit, "chat": b.apply_chat_template,
               "max_length": b.max_length, "seed": b.seed, "files": self.files, "lm_eval": _version()}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def _path(self, fingerprint: str, task: str, kind: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
        return self.folder / fingerprint[:24] / f"{safe}.{self._settings(task, kind)}.json"

    def _evaluate(self, lm, task: str, chat: bool) -> dict:
        """One task through ``lm_eval.simple_evaluate`` -> ``{"metrics", "higher_is_better", "samples"}``."""
        lm_eval = self._lm_eval()
        b = self.bcfg
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=b.num_fewshot, limit=b.limit,
                                      task_manager=self.task_manager(), apply_chat_template=chat,
                                      log_samples=False, bootstrap_iters=0, random_seed=b.seed,
                                      numpy_random_seed=b.seed, torch_random_seed=b.seed, fewshot_random_seed=b.seed)
        results = res["results"]
        entry = results.get(task) or {}
        metrics = metric_values(entry)
        if not metrics:  # a group without an aggregate: its tasks' figures, prefixed
            metrics = {f"{t}/{m}": v for t, e in results.items() for m, v in metric_values(e).items()}
        higher = {m: bool(v) for t, hb in (res.get("higher_is_better") or {}).items() for m, v in hb.items()}
        return {"metrics": metrics, "higher_is_better": higher,
                "samples": {t: n.get("effective") for t, n in (res.get("n-samples") or {}).items()}}

    def _run(self, who: str, fingerprint: str, kind: str, make_lm: Callable, chat: bool, names: list[str]) -> dict:
        """``{task: metrics}`` for ``names``; the model wrapper is made only when a task is not kept yet."""
        out, lm = {}, None
        for name in names:
            def compute(name=name):
                nonlocal lm
                if lm is None:
                    lm = make_lm()
                self.say(f"benchmark {name}: {who}")
                try:
                    return self._evaluate(lm, name, chat)
                except (KDistillError, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - lm-eval, its task files and the server raise many types
                    msg = (str(exc).strip().splitlines() or [""])[0][:300]
                    raise BenchmarkError(f"eval.benchmarks: task {name} failed for the {who} ({type(exc).__name__}: "
                                         f"{msg})") from None

            r = memo_json(self._path(fingerprint, name, kind), compute,
                          valid=lambda v: isinstance(v, dict) and "metrics" in v)
            self._note_higher(name, r)
            out[name] = r["metrics"]
        return out

    def _note_higher(self, task: str, r: dict) -> None:
        hb = r.get("higher_is_better") or {}
        self.higher[task] = {m: hb.get(m.split(" (")[0].split("/")[-1], True) for m in r["metrics"]}

    def local(self, who: str, model, tokenizer) -> dict:
        """``{task: {metric: value}}`` of a local model (cached per task)."""
        fp = model_fingerprint(model, tokenizer)

        def make():
            self._lm_eval()
            from lm_eval.models.huggingface import HFLM

            kw = {"max_length": self.bcfg.max_length} if self.bcfg.max_length else {}
            was = model.training
            model.eval()
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.bcfg.batch_size, **kw)
            model.train(was)
            return lm

        return self._run(who, fp, "hf", make, self.bcfg.apply_chat_template, [t.name for t in self.bcfg.task_list()])

    def api(self, who: str, api_cfg) -> tuple[dict, dict]:
        """``({task: metrics}, {task: why not measured})`` of an OpenAI-compatible chat endpoint:
        generation tasks only (a chat endpoint gives no log-likelihoods)."""
        fp = hashlib.sha1(f"api:{api_cfg.base_url}:{api_cfg.model}".encode()).hexdigest()
        tm = self.task_manager()
        runnable, skipped = [], {}
        for t in self.bcfg.task_list():
            kinds = {getattr(task, "OUTPUT_TYPE", None) for task in tm.load([t.name])["tasks"].values()}
            if kinds <= {"generate_until"}:
                runnable.append(t.name)
            else:
                skipped[t.name] = (f"an API teacher gives no log-likelihoods ({', '.join(sorted(k for k in kinds if k))} "
                                   "task); only generation tasks are measured")

        def make():
            from lm_eval.models.openai_completions import LocalChatCompletion

            key = os.environ.get(api_cfg.api_key_env, "") if api_cfg.api_key_env else ""
            return LocalChatCompletion(base_url=api_cfg.base_url.rstrip("/") + "/chat/completions", model=api_cfg.model,
                                       num_concurrent=api_cfg.max_concurrency, max_retries=max(1, api_cfg.max_retries),
                                       timeout=int(api_cfg.timeout), tokenizer_backend=None,
                                       header={"Authorization": f"Bearer {key}"} if key else {})

        return self._run(who, fp, "api", make, True, runnable), skipped


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001
        return "?"


def benchmark_table(results: dict, higher: dict) -> dict:
    """``{task: {metric: {teacher, student_initial?, student, retention}}}`` from ``results``
    ``{who: {task: {metric: value}}}``. Retention is student/teacher for higher-is-better metrics and
    teacher/student otherwise (1.0 = parity); None when a side is missing or zero."""
    table: dict = {}
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    for task in tasks:
        metrics = list(dict.fromkeys(m for r in results.values() for m in (r.get(task) or {})))
        rows = {}
        for m in metrics:
            row = {who: (results[who].get(task) or {}).get(m) for who in ("teacher", "student_initial", "student")
                   if who in results}
            t, s = row.get("teacher"), row.get("student")
            up = (higher.get(task) or {}).get(m, True)
            ret = None
            if t is not None and s is not None:
                ret = (s / t if t else None) if up else (t / s if s else None)
            row["retention"] = None if ret is None else round(ret, 4)
            rows[m] = row
        table[task] = rows
    return table
