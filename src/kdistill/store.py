"""Everything kdistill writes so that a rerun resumes: one module, one set of rules.

* :func:`atomic_write` / :func:`write_json` / :func:`write_jsonl` — a whole file replaced at once
  (temp file in the same folder, fsync, rename, folder fsync): a reader sees the old file or the
  new one, never half of one.
* :func:`read_jsonl_rows` — the one rule for append-only JSONL files: every line that parses and has
  the key is kept (the first one per key wins); a line that does not (a torn last line left by a
  kill, a corrupt line) is dropped, and the file is repaired in place when anything was dropped.
* :class:`JsonlStore` — an append-only JSONL of rows keyed by id (teacher answers, candidates,
  judge scores): a rerun asks only for what is missing, and never twice for anything written.
* :func:`memo_json` — a JSON result computed once and read back on every rerun.
* :func:`run_stage` — a multi-pass method's stage: skipped when its ``done.json`` exists, else
  run, saved and marked done.
* :func:`on_main` — under several processes, files are written once (by the main process) and
  every process waits until they are there.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from kdistill.errors import ConfigError


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, key: str):
    """Hold an exclusive lock on ``lock_path`` while the block runs (one writer per output).

    The lock is an ``flock`` on the file: the operating system releases it when the process ends,
    however it ends (``kill -9`` included), so a stale lock never blocks a rerun. The holder writes
    its process id into the file; a second writer gets a :class:`~kdistill.errors.ConfigError`
    naming ``key``, what is being written and the process that holds it.
    """
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(f"{key}: another kdistill process{who} is writing {what}; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


MARK = ".kdistill"  # in a folder kdistill writes into: it is kdistill's (a run's output, a cache)
LOCK_FILE = ".kdistill.lock"  # the lock of the one process writing a folder (see exclusive)


def check_own_folder(path: Path, key: str, what: str, also_ours: tuple = ()) -> None:
    """Refuse to write into ``path`` unless it is new, empty, or already kdistill's.

    A folder is kdistill's when it holds :data:`MARK` (or one of ``also_ours``: the files older
    versions left there). Nothing is created or changed here.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder")
    foreign = path.is_dir() and any(f.name not in (MARK, LOCK_FILE) for f in path.iterdir())
    if foreign and not any((path / m).exists() for m in (MARK, *also_ours)):
        raise ConfigError(f"{key}: {path} is not empty and is not a kdistill {what}; give a new or empty folder "
                          "(nothing in it was changed)")


def claim_folder(path: Path, what: str) -> None:
    """Create ``path`` (if needed) and mark it as kdistill's (see :func:`check_own_folder`)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / MARK).exists():
            atomic_write(path / MARK, json.dumps({"kdistill": what}) + "\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write here ({exc.strerror or exc})") from None


def _state():
    from accelerate import PartialState

    return PartialState()


def on_main(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on the main process only, then wait for every process."""
    st = _state()
    if st.is_main_process:
        fn()
    st.wait_for_everyone()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically (``.tmp-NAME.PID`` beside it, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")  # several processes may write the same file
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with open(tmp, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def dumps_jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_json(path: Path, value, main_only: bool = True) -> None:
    """A JSON file written atomically; with ``main_only`` once (main process) while every process waits."""
    write = lambda: atomic_write(Path(path), json.dumps(value, indent=2))  # noqa: E731
    on_main(write) if main_only else write()


def write_jsonl(path: Path, rows: list[dict], main_only: bool = True) -> None:
    """A whole JSONL file written atomically (see :func:`write_json`)."""
    write = lambda: atomic_write(Path(path), dumps_jsonl(rows))  # noqa: E731
    on_main(write) if main_only else write()


def read_json(path: Path) -> Optional[Any]:
    """The JSON value in ``path``; None when the file is missing or unreadable (a torn write)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl_rows(path: Path, key: str = "id", repair: bool = True,
                    valid: Optional[Callable[[dict], bool]] = None) -> tuple[dict, int]:
    """Rows of an append-only JSONL file by ``key``, and how many lines were dropped.

    A line that is not a JSON object with ``key`` (torn by a kill, corrupt), or that ``valid``
    rejects, is dropped; of two lines with the same key the first is kept. With ``repair``, a file
    that lost lines is rewritten atomically without them, so later appends start on a clean line.
    """
    path = Path(path)
    if not path.is_file():
        return {}, 0
    raw = path.read_bytes()
    rows: dict = {}
    keep: list[bytes] = []
    dropped = 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            k = row[key]
            hash(k)
            if valid is not None and not valid(row):
                raise ValueError
        except (ValueError, KeyError, TypeError, IndexError):
            dropped += 1
            continue
        if k in rows:
            dropped += 1
            continue
        rows[k] = row
        keep.append(line)
    if repair and (dropped or (raw and not raw.endswith(b"\n"))):
        atomic_write(path, b"".join(l + b"\n" for l in keep))
    return rows, dropped


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append whole lines (flushed and fsynced before returning)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class JsonlStore:
    """An append-only JSONL file of rows keyed by ``key`` (default ``id``); see :func:`read_jsonl_rows`.

    Under several processes, :meth:`fill` shares the missing items out (process r takes every
    world-th one) and each process appends to its own ``<file>.part-r``; the main process then
    merges the parts into the file, and every process returns all rows. Parts left by a crash are
    merged when the store is next opened.
    """

    def __init__(self, path: Path, key: str = "id", shared: bool = True):
        self.path = Path(path)
        self.key = key
        if shared:
            st = _state()
            self.world, self.rank = st.num_processes, st.process_index
            on_main(self._consolidate)
        else:
            self.world, self.rank = 1, 0
            self._consolidate()
        self.rows, _ = read_jsonl_rows(self.path, key, repair=False)

    def _part(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part-{rank}")

    def _consolidate(self) -> None:
        """(main process) Bad lines dropped, leftover parts merged into the file and removed."""
        rows, _ = read_jsonl_rows(self.path, self.key)
        parts = sorted(self.path.parent.glob(f"{self.path.name}.part-*")) if self.path.parent.is_dir() else []
        merged = dict(rows)
        for part in parts:
            for k, row in read_jsonl_rows(part, self.key, repair=False)[0].items():
                merged.setdefault(k, row)
        if parts:
            atomic_write(self.path, dumps_jsonl(merged.values()))
        for part in parts:
            part.unlink()

    def __contains__(self, k) -> bool:
        return k in self.rows

    def get(self, k, default=None):
        return self.rows.get(k, default)

    def append(self, rows: list[dict], path: Optional[Path] = None) -> None:
        append_jsonl(path or self.path, rows)
        for r in rows:
            self.rows[r[self.key]] = r

    def fill(self, items: list, key_of: Callable, make: Callable[[list], list[dict]], batch_size: int,
             desc: Optional[str] = None, allow_missing: bool = False) -> list[dict]:
        """Run ``make`` on the items not stored yet, ``batch_size`` at a time; all rows in item order.

        With ``desc``, a progress bar (main process) counts done/total items. ``allow_missing``:
        ``make`` may return no row for an item (e.g. a failed request): it is left out of the
        result and made again on the next fill.
        """
        todo = [it for it in items if key_of(it) not in self.rows]
        mine = todo[self.rank:: self.world]
        target = self.path if self.world == 1 else self._part(self.rank)
        bar = None
        if desc is not None and todo and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="prompt", dynamic_ncols=True)
        for i in range(0, len(mine), batch_size):
            chunk = mine[i: i + batch_size]
            self.append(make(chunk), target)
            if bar is not None:
                bar.update(min(len(chunk) * self.world, bar.total - bar.n))
        if bar is not None:
            bar.close()
        if self.world > 1:
            _state().wait_for_everyone()
            on_main(self._consolidate)
            self.rows, _ = read_jsonl_rows(self.path, self.key, repair=False)
        if allow_missing:
            return [self.rows[key_of(it)] for it in items if key_of(it) in self.rows]
        return [self.rows[key_of(it)] for it in items]


def memo_json(path: Optional[Path], compute: Callable[[], Any], valid: Callable[[Any], bool] = lambda v: True):
    """``compute()``'s result, kept in ``path``: a rerun reads it back instead of computing it again.

    A missing, torn or (by ``valid``) outdated file is computed anew and replaced atomically.
    ``path`` None: no memo.
    """
    if path is not None:
        saved = read_json(path)
        if saved is not None and valid(saved):
            return saved
    value = compute()
    if path is not None:
        atomic_write(Path(path), json.dumps(value))
    return value


DONE = "done.json"


def stage_done(folder: Path) -> Optional[dict]:
    """The summary a finished stage left in ``done.json``, or None (also when that file is torn)."""
    return read_json(Path(folder) / DONE)


def run_stage(folder: Path, work: Callable[[], tuple[Any, dict]], reuse: Callable[[dict], Any]) -> tuple[Any, dict]:
    """One resumable stage of a multi-pass method, in its own ``folder``.

    When ``folder/done.json`` exists the stage finished earlier: ``reuse(summary)`` gives its
    result (e.g. loads its saved student), and the summary returned says ``finished_earlier``. Otherwise ``work()`` runs it — it resumes by itself from
    whatever it left in ``folder`` (checkpoints, append-only files) and saves its outputs — and
    returns ``(result, summary)``; the summary is then written to ``done.json``.
    """
    done = stage_done(folder)
    if done is not None:
        return reuse(done), {**done, "finished_earlier": True}
    result, summary = work()
    write_json(Path(folder) / DONE, summary)
    return result, summary
