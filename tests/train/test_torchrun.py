"""Running torchrun (`megasft train --nproc N`) for real, with two processes."""

from __future__ import annotations

import sys

import pytest

from megasft.errors import LaunchError
from megasft.train.torchrun import run_torchrun

WORKER = """
import os
rank = int(os.environ["RANK"])
print(f"hello from rank {rank} of {os.environ['WORLD_SIZE']}", flush=True)
if rank == 1 and os.environ.get("FAIL") == "1":
    raise RuntimeError("the real cause, on rank 1")
"""


@pytest.fixture
def worker_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_worker.py").write_text(WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sys.path.insert(0, str(tmp_path))
    yield "tiny_worker"
    sys.path.remove(str(tmp_path))


def test_output_is_streamed_from_every_rank(tmp_path, worker_module):
    lines = []
    run_torchrun(worker_module, [], nproc=2, log_dir=tmp_path / "logs", echo=lines.append)
    text = "".join(lines)
    assert "hello from rank 0 of 2" in text and "hello from rank 1 of 2" in text


def test_failure_names_the_rank_and_ends_with_its_last_lines(tmp_path, worker_module):
    with pytest.raises(LaunchError) as caught:
        run_torchrun(
            worker_module,
            [],
            nproc=2,
            log_dir=tmp_path / "logs",
            env={"FAIL": "1"},
            echo=lambda line: None,
        )
    message = str(caught.value)
    assert message.startswith("rank 1 failed with exit code 1")
    assert message.rstrip().endswith("RuntimeError: the real cause, on rank 1")
