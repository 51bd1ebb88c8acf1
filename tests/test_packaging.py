"""What a wheel of megasft installs, and which megasft the tests and their processes import."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import megasft
from tests.conftest import REPO, SRC

PRINT_MEGASFT = "import megasft; print(megasft.__file__)"
WRITE_MEGASFT = "import sys, megasft; open(sys.argv[1], 'w').write(megasft.__file__)"


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the checkout (setuptools builds in place; the checkout stays clean)."""
    pytest.importorskip("setuptools", minversion="68")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("src", "components", "pipelines"):
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("megasft-*.whl")
    return wheel


def test_the_wheel_installs_the_pipeline_under_megasft_and_nothing_else_at_the_top(tmp_path):
    names = set(zipfile.ZipFile(_build_wheel(tmp_path)).namelist())

    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"megasft"}
    for folder, package in (("components", "_components"), ("pipelines", "_pipelines")):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".yaml"):
                assert f"megasft/{package}/{path.relative_to(REPO / folder)}" in names, path
    for path in (SRC / "megasft").rglob("*.py"):
        assert path.relative_to(SRC).as_posix() in names, path


@pytest.mark.slow
def test_the_installed_package_compiles_the_pipeline_it_carries(tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(_build_wheel(tmp_path)).extractall(site)
    # Only the unpacked wheel on the path, run away from any checkout: what a user installs.
    script = (
        "import sys, megasft; from megasft.pipeline import sources; "
        "from megasft.pipeline.compile import compile_pipeline; "
        "assert sources.checkout_root() is None; "
        "compile_pipeline(sys.argv[1]); "
        "print(megasft.__file__); print(sources.pipelines_package().__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pipeline.yaml")],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    package, pipelines = result.stdout.split()
    assert Path(package) == site / "megasft" / "__init__.py"
    assert Path(pipelines) == site / "megasft" / "_pipelines" / "__init__.py"
    assert "megasft-sft" in (tmp_path / "pipeline.yaml").read_text()


def test_a_checkout_binds_its_own_components_and_pipelines():
    from megasft.pipeline import sources

    assert sources.checkout_root() == REPO
    assert sources.configs_directory() == REPO / "pipelines" / "configs"
    sources.sft_pipeline()
    assert Path(sys.modules["megasft._components.train"].__file__) == REPO / "components/train.py"


def test_the_tests_import_this_checkouts_megasft():
    assert Path(megasft.__file__) == SRC / "megasft" / "__init__.py"


def test_a_spawned_process_imports_this_checkouts_megasft(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", PRINT_MEGASFT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert Path(result.stdout.strip()) == SRC / "megasft" / "__init__.py"


@pytest.mark.slow
def test_a_torchrun_worker_imports_this_checkouts_megasft(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WRITE_MEGASFT + "\n")
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "1", str(worker), str(tmp_path / "imported.txt"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path((tmp_path / "imported.txt").read_text()) == SRC / "megasft" / "__init__.py"
