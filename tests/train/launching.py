"""Starting the training worker processes (see train_worker.py) and reading their results."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO

WORKER = REPO / "tests" / "train" / "train_worker.py"


def worker_env() -> dict[str, str]:
    # One thread per process: the two cores are shared by two ranks, and the same thread
    # count in every run keeps the floating-point sums in the same order. PYTHONPATH, with the
    # checkout's src/ first, comes from tests/conftest.py.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(command: list[str], timeout: int) -> None:
    result = subprocess.run(
        command, env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def result_of(results: dict, name: str) -> dict:
    """One scenario's result; fails the test with the scenario's error if it raised."""
    assert name in results, f"the worker ran no scenario {name}"
    assert "error" not in results[name], results[name]["error"]
    return results[name]
