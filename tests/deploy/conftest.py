"""Fixtures of the deploy tests: the overlays, rendered once per session."""

from __future__ import annotations

import pytest

from tests.deploy.rendering import (
    OVERLAYS,
    find_kustomize,
    render,
    render_composed,
    render_standalone,
)


@pytest.fixture(scope="session")
def kustomize() -> list[str]:
    command, reason = find_kustomize()
    if command is None:
        pytest.skip(reason)
    return command


@pytest.fixture(scope="session")
def rendered(kustomize) -> dict[str, list[dict]]:
    """Every overlay in OVERLAYS, rendered: the objects a cluster would receive."""
    return {overlay: render(kustomize, overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def standalone(kustomize, tmp_path_factory) -> list[dict]:
    """The MI300X overlay for standalone Kubeflow Pipelines (rendering.render_standalone)."""
    return render_standalone(kustomize, tmp_path_factory.mktemp("standalone"))


@pytest.fixture(scope="session")
def cuda_pytorchjob(kustomize, tmp_path_factory) -> list[dict]:
    """The v1-operator overlay (examples/training-operator-v1) for NVIDIA nodes, rendered."""
    return render_composed(
        kustomize,
        tmp_path_factory.mktemp("cuda-pytorchjob"),
        ["base"],
        ["components/pytorchjob", "components/cuda", "components/worker-from-master"],
    )
