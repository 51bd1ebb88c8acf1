"""Fixtures of the deploy tests: the overlays, rendered once per session."""

from __future__ import annotations

import pytest

from tests.deploy.rendering import OVERLAYS, find_kustomize, render


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
