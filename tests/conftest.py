from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def checkout_pythonpath(existing: str = "") -> str:
    """PYTHONPATH with this checkout's src/ first, then its root (workers import `tests.*`).

    Args:
        existing: the PYTHONPATH to extend; its other entries are kept after these two.

    Returns:
        The new value.
    """
    ours = [str(SRC), str(REPO)]
    return os.pathsep.join([*ours, *(p for p in existing.split(os.pathsep) if p and p not in ours)])


# Every process the tests start (torchrun workers, CLI commands, kfp.local steps) inherits this,
# so it imports the checkout under test, never a megasft installed elsewhere; pyproject's
# `pythonpath` does the same for the pytest process itself.
os.environ["PYTHONPATH"] = checkout_pythonpath(os.environ.get("PYTHONPATH", ""))
# Real data for tests and benchmarks lives beside the checkout; tests that use it skip without it.
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (../shared holds the real data)")
    return path
