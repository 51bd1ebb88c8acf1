"""A checkpoint directory's fingerprint: what a PEFT run's adapters record of their base.

sha256 over every file's relative path and size and over its bytes; a file above 64 MiB (a
tensor shard of a large model) contributes its first and last 4 MiB only, so that an 8B or
70B base is fingerprinted in seconds. Renaming, resizing or rewriting a shard changes it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

WHOLE_FILE_LIMIT = 64 * 2**20
EDGE_BYTES = 4 * 2**20


@functools.lru_cache(maxsize=8)
def checkpoint_fingerprint(directory: str | os.PathLike) -> str:
    """The fingerprint of a checkpoint directory (see the module's docstring).

    Args:
        directory: a megatron checkpoint (converted, or an iter_* directory).

    Returns:
        "sha256:" and the hex digest.
    """
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as file:
            if size <= WHOLE_FILE_LIMIT:
                for block in iter(lambda: file.read(2**20), b""):
                    digest.update(block)
            else:
                digest.update(file.read(EDGE_BYTES))
                file.seek(size - EDGE_BYTES)
                digest.update(file.read(EDGE_BYTES))
    return f"sha256:{digest.hexdigest()}"
