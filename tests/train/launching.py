"""Starting the training worker processes (see train_worker.py) and reading their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def run_mode(worker: Path, mode: str, work: Path, processes: int = 1) -> dict:
    """Runs one mode of a worker (train_worker.py or lora_worker.py) on the workspace `work`,
    in one process or under torchrun; its results, {scenario: result}."""
    command = [sys.executable, str(worker), mode, str(work)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(processes)]  # fmt: skip
    launch(command, timeout=900)
    return json.loads((work / f"results_{mode}.json").read_text())


def result_of(results: dict, name: str) -> dict:
    """One scenario's result; fails the test with the scenario's error if it raised."""
    assert name in results, f"the worker ran no scenario {name}"
    assert "error" not in results[name], results[name]["error"]
    return results[name]
