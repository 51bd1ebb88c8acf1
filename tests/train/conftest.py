"""The training runs the tests in this folder share: the inputs (one workspace per session),
then one launch per worker mode (see train_worker.py): single-process and two-process runs of
the dense model, and the same for the mixture-of-experts model."""

from __future__ import annotations

import pytest

from tests.train.launching import WORKER, run_mode
from tests.train.workspace import Workspace, make_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("train")
    workspace = make_workspace(root)
    workspace.save(root / "workspace.json")
    return workspace


@pytest.fixture(scope="session")
def single(workspace) -> dict:
    return run_mode(WORKER, "single", workspace.root)


@pytest.fixture(scope="session")
def parallel(workspace) -> dict:
    return run_mode(WORKER, "parallel", workspace.root, processes=2)


@pytest.fixture(scope="session")
def moe_single(workspace) -> dict:
    return run_mode(WORKER, "moe_single", workspace.root)


@pytest.fixture(scope="session")
def moe_parallel(workspace) -> dict:
    return run_mode(WORKER, "moe_parallel", workspace.root, processes=2)
