"""The training runs the tests in this folder share: the inputs, then one single-process and
one two-process worker launch per session (see train_worker.py)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.train.launching import WORKER, launch
from tests.train.workspace import Workspace, make_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("train")
    workspace = make_workspace(root)
    workspace.save(root / "workspace.json")
    return workspace


@pytest.fixture(scope="session")
def single(workspace) -> dict:
    launch([sys.executable, str(WORKER), "single", str(workspace.root)], timeout=900)
    return json.loads((workspace.root / "results_single.json").read_text())


@pytest.fixture(scope="session")
def parallel(workspace) -> dict:
    launch(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", str(WORKER), "parallel", str(workspace.root),
        ],
        timeout=900,
    )  # fmt: skip
    return json.loads((workspace.root / "results_parallel.json").read_text())
