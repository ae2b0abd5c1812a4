"""What kdistill guarantees when a user makes a mistake: nothing of theirs is lost or leaked."""

from __future__ import annotations

import pytest

from conftest import base_config
from kdistill.cli import main


def _write_config(path, cfg: dict):
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("where", ["data folder", "run folder"])
def test_cache_teacher_never_deletes_files_in_a_folder_it_does_not_own(tiny, tmp_path, capsys, where):
    """cache.path pointed at a folder with the user's files: refused with one line, every file intact."""
    folder = tmp_path / "mine"
    folder.mkdir()
    files = {"train.jsonl": (tiny / "train.jsonl").read_text(), "notes.txt": "my notes\n",
             "config.yaml": "output_dir: x\n", "metrics.jsonl": '{"step": 1}\n'}
    if where == "run folder":
        files["report.md"] = "# report\n"
    for name, text in files.items():
        (folder / name).write_text(text)
    cfg = base_config(tiny, tmp_path / "out", cache={"path": str(folder), "top_k": 4})
    code = main(["cache-teacher", str(_write_config(tmp_path / "c.yaml", cfg)), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "not a kdistill teacher cache" in err and str(folder) in err and "Traceback" not in err
    assert len([l for l in err.splitlines() if l.startswith("kdistill: error")]) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, text in files.items():
        assert (folder / name).read_text() == text


def test_cache_teacher_cleans_only_its_own_leftovers(tiny, tmp_path):
    """In a cache folder, an unlisted shard and a temp file (a crash's leftovers) are removed; a file
    the user put there is not."""
    folder = tmp_path / "cache"
    cfg = base_config(tiny, tmp_path / "out", cache={"path": str(folder), "top_k": 4, "shard_size": 32})
    path = _write_config(tmp_path / "c.yaml", cfg)
    assert main(["cache-teacher", str(path), "--no-progress"]) == 0
    (folder / "shard-00099.npz").write_bytes(b"stray")
    (folder / ".tmp-shard-00100.npz").write_bytes(b"torn")
    (folder / "README.txt").write_text("what this cache is for\n")
    assert main(["cache-teacher", str(path), "--no-progress"]) == 0
    names = {p.name for p in folder.iterdir()}
    assert "shard-00099.npz" not in names and ".tmp-shard-00100.npz" not in names
    assert (folder / "README.txt").read_text() == "what this cache is for\n"
