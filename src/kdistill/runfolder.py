"""A run's output folder: kdistill's own, one writer at a time, and tied to the settings that made it.

* **Ownership.** ``output_dir`` is new, empty or already a kdistill run (it holds ``.kdistill``, or
  the ``config.yaml`` / ``checkpoints/`` an older version left): any other folder is refused, so a
  run never overwrites a user's files.
* **One writer.** The main process holds ``output_dir/.kdistill.lock`` (:func:`kdistill.store.exclusive`)
  for the whole run; a second ``kdistill run`` on the folder is refused and names the first one.
* **Identity.** ``run.json`` records what the training depends on: the resolved config without the
  keys that do not change what is trained (evaluation, logging, checkpoint cadence, threads, time
  budget, request settings), and a hash of every training data file. A rerun whose identity
  differs is refused with the changed keys named — resuming it would give a model no config
  describes — unless ``train.resume: accept_changes`` says to continue with the new settings
  (recorded in ``run.json``'s history). ``config.yaml`` is written only by the config that made
  (or continues, by choice) the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import yaml

from kdistill.errors import ConfigError
from kdistill.store import LOCK_FILE, MARK, atomic_write, check_own_folder, claim_folder, read_json

IDENTITY = "run.json"
LOCK = LOCK_FILE
LEGACY = ("config.yaml", "checkpoints", "report.json")  # what marks a folder written by an older kdistill

#: keys that do not change what is trained (dotted; a section name drops the whole section)
NOT_TRAINING = (
    "output_dir", "eval", "cache", "report", "data.eval", "data.max_eval_rows",
    "train.log_every", "train.save_every", "train.save_total_limit", "train.num_threads", "train.max_minutes",
    "train.resume", "train.report_to",
    "vllm.gpu_memory_utilization", "vllm.enforce_eager", "vllm.enable_sleep_mode",
    "zephyr.win_rate_prompts",
)
_API_TRANSPORT = ("api_key_env", "max_concurrency", "timeout", "max_retries", "backoff_base", "backoff_max", "prefetch")
_DATA_FILES = ("data.train", "generate.prompts", "dpo.pairs", "zephyr.sft_data")


def _drop(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if not rest:
        tree.pop(head)
    elif isinstance(tree[head], dict):
        _drop(tree[head], rest)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return "missing"
    return h.hexdigest()[:16]


def training_identity(cfg) -> dict:
    """What the trained model depends on: settings (without :data:`NOT_TRAINING`) and data file hashes."""
    tree = cfg.model_dump(mode="json", by_alias=True)
    for key in NOT_TRAINING:
        _drop(tree, key)
    for t in ([tree.get("teacher")] + list(tree.get("teachers") or [])):
        if isinstance(t, dict) and isinstance(t.get("api"), dict):
            for k in _API_TRANSPORT:
                t["api"].pop(k, None)
    files = {k: _get(tree, k) for k in _DATA_FILES if isinstance(_get(tree, k), str)}
    for i, task in enumerate((tree.get("data") or {}).get("tasks") or []):
        files[f"data.tasks[{i}].train"] = task["train"]
        task.pop("eval", None)
    return {"settings": tree, "data": {k: {"path": v, "sha256": _file_hash(v)} for k, v in sorted(files.items())}}


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: tree}


def changed_keys(old: dict, new: dict, only_old: bool = False) -> list[str]:
    """The dotted keys whose values differ between two identities (data files by their key).
    ``only_old``: compare only the keys ``old`` has (an older kdistill knew fewer keys)."""
    a, b = _flat(old.get("settings", {})), _flat(new.get("settings", {}))
    keys = sorted(k for k in (set(a) if only_old else set(a) | set(b)) if a.get(k) != b.get(k))
    da, db = old.get("data", {}), new.get("data", {})
    if only_old:
        return keys
    keys += sorted(f"{k} (file contents)" if k in da and k in db and da[k]["path"] == db[k]["path"] else k
                   for k in set(da) | set(db) if da.get(k) != db.get(k) and k not in keys)
    return keys


def prepare(cfg, out: Path, dump: Callable[[object], str], say: Callable[[str], None]) -> dict:
    """Check and claim ``out`` for a training run of ``cfg`` (before the lock: see :func:`lock`).

    Returns ``{"changed": [keys] or [], "fresh": bool}``; raises ConfigError for a folder that is not
    kdistill's, or for a changed identity without ``train.resume: accept_changes``.
    """
    check_own_folder(out, "output_dir", "run folder", LEGACY)
    claim_folder(out, "run")
    new = training_identity(cfg)
    saved = read_json(out / IDENTITY)
    has_run = saved is not None or (out / "checkpoints").is_dir()
    legacy = saved is None and has_run
    if legacy:  # a run from an older kdistill: its config.yaml is its identity (keys it had, no data hashes)
        old_cfg = _legacy_config(out / "config.yaml")
        saved = {"identity": old_cfg} if old_cfg is not None else None
    changed = changed_keys(saved["identity"], new, only_old=legacy) if saved is not None else []
    history = list((saved or {}).get("history", []))
    if changed and cfg.train.resume != "accept_changes":
        shown = ", ".join(changed[:6]) + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else "")
        raise ConfigError(f"output_dir: {out} holds a run made with other training settings or data ({shown}); "
                          "give a new output_dir to start over, or --set train.resume=accept_changes to continue "
                          "this run with the new settings")
    if changed:
        say(f"continuing the run in {out} with changed settings ({', '.join(changed)}): train.resume=accept_changes")
        history.append({"changed": changed})
    if legacy or saved is None or changed:  # new, written by an older version (or torn), or continued by choice
        atomic_write(out / IDENTITY, json.dumps({"identity": new, "history": history}, indent=1))
    if not has_run or changed or not (out / "config.yaml").is_file():
        atomic_write(out / "config.yaml", dump(cfg))
    return {"changed": changed, "fresh": not has_run}


def _legacy_config(path: Path):
    """The identity of the config an older kdistill wrote into ``config.yaml`` (None if unreadable)."""
    try:
        from_yaml = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(from_yaml, dict):
        return None
    for key in NOT_TRAINING:
        _drop(from_yaml, key)
    return {"settings": from_yaml, "data": {}}


def is_run_folder(path: Path) -> bool:
    return (Path(path) / MARK).exists() or any((Path(path) / m).exists() for m in LEGACY)
