"""The base fingerprint a LoRA checkpoint records: it changes with any file's name, size or
bytes, and only reads the ends of large files."""

from __future__ import annotations

from megasft.checkpoint import fingerprint
from megasft.checkpoint.fingerprint import checkpoint_fingerprint


def _directory(path, **files):
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_same_files_give_the_same_fingerprint_and_any_change_another(tmp_path):
    one = _directory(tmp_path / "one", a=b"weights", b=b"metadata")
    same = _directory(tmp_path / "same", a=b"weights", b=b"metadata")
    changed = _directory(tmp_path / "changed", a=b"weightz", b=b"metadata")
    renamed = _directory(tmp_path / "renamed", a=b"weights", c=b"metadata")
    prints = [checkpoint_fingerprint(path) for path in (one, same, changed, renamed)]
    assert prints[0] == prints[1] and prints[0].startswith("sha256:")
    assert len(set(prints[1:])) == 3


def test_a_large_file_contributes_its_size_and_its_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE_FILE_LIMIT", 16)
    monkeypatch.setattr(fingerprint, "EDGE_BYTES", 4)
    base = _directory(tmp_path / "base", shard=b"HEAD" + b"x" * 32 + b"TAIL")
    middle = _directory(tmp_path / "middle", shard=b"HEAD" + b"y" * 32 + b"TAIL")
    end = _directory(tmp_path / "end", shard=b"HEAD" + b"x" * 32 + b"TAIl")
    assert checkpoint_fingerprint(base) == checkpoint_fingerprint(middle)  # not read
    assert checkpoint_fingerprint(base) != checkpoint_fingerprint(end)
