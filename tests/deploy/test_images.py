"""megasft.images: the one place image references come from, its overrides, and `make images`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from megasft import __version__
from megasft.images import (
    DEFAULT_REGISTRY,
    IMAGES,
    NO_ENGINE_EXIT_CODE,
    ImageError,
    ImageRef,
    image_for,
    main,
)
from tests.conftest import REPO

DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_defaults_are_the_example_registry_and_the_package_version():
    for name in IMAGES:
        assert image_for(name, {}).reference == f"{DEFAULT_REGISTRY}/{name}:{__version__}"


def test_registry_and_tag_apply_to_every_image():
    environ = {"MEGASFT_IMAGE_REGISTRY": "ghcr.io/acme/ml/", "MEGASFT_IMAGE_TAG": "2024.06.1"}
    assert image_for("cpu", environ).reference == "ghcr.io/acme/ml/cpu:2024.06.1"
    assert image_for("train-rocm", environ).reference == "ghcr.io/acme/ml/train-rocm:2024.06.1"


def test_an_image_override_is_taken_whole_and_wins():
    environ = {
        "MEGASFT_IMAGE_REGISTRY": "ghcr.io/acme",
        "MEGASFT_IMAGE_TAG": "1.0",
        "MEGASFT_IMAGE_TRAIN_ROCM": f"harbor.acme.example:8443/ml/megasft-train@{DIGEST}",
    }
    image = image_for("train-rocm", environ)
    assert image == ImageRef("harbor.acme.example:8443/ml", "megasft-train", None, DIGEST)
    assert image.reference == f"harbor.acme.example:8443/ml/megasft-train@{DIGEST}"
    assert image_for("train-cuda", environ).reference == "ghcr.io/acme/train-cuda:1.0"


@pytest.mark.parametrize(
    "reference",
    [
        "registry.example.com/megasft/cpu:0.1.0",
        f"registry.example.com/megasft/cpu@{DIGEST}",
        f"localhost:5000/cpu:v1@{DIGEST}",
        "localhost:5000/a/b/c:latest",
    ],
)
def test_parse_is_the_inverse_of_reference(reference):
    assert ImageRef.parse(reference).reference == reference


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEGASFT_IMAGE_CPU", "cpu:1.0", "has no registry"),
        ("MEGASFT_IMAGE_CPU", "ghcr.io/acme/cpu@sha256:abc", "is not a digest"),
        ("MEGASFT_IMAGE_CPU", "ghcr.io/acme/CPU:1.0", "not a valid image name"),
        ("MEGASFT_IMAGE_CPU", "ghcr.io/acme/cpu", "needs a tag or a digest"),
        ("MEGASFT_IMAGE_TAG", "bad tag", "not a valid image tag"),
        ("MEGASFT_IMAGE_REGISTRY", "ghcr.io/Acme", "not a valid image name"),
    ],
)
def test_a_malformed_override_is_refused_naming_the_variable(variable, value, message):
    with pytest.raises(ImageError, match=message) as caught:
        image_for("cpu", {variable: value})
    assert variable in str(caught.value)


def test_an_unknown_image_is_refused_with_the_known_ones():
    with pytest.raises(ImageError, match="known: train-rocm, train-cuda, cpu, mlflow"):
        image_for("train-tpu", {})


def test_list_prints_image_dockerfile_and_reference(capsys, monkeypatch):
    for name in ("MEGASFT_IMAGE_REGISTRY", "MEGASFT_IMAGE_TAG", "MEGASFT_IMAGE_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEGASFT_IMAGE_CPU", f"ghcr.io/acme/cpu@{DIGEST}")
    assert main(["--list"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows] == list(IMAGES)
    for name, dockerfile, reference in rows:
        assert (REPO / dockerfile).is_file()
        assert reference == image_for(name).reference
    assert rows[2][2] == f"ghcr.io/acme/cpu@{DIGEST}"


def fake_engine(directory, name, info_exit_code, log):
    """A `docker`/`podman` stand-in that logs its arguments and answers `info` as told."""
    script = directory / name
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        f'if [ "$1" = info ]; then echo "Cannot connect to the {name} daemon" >&2; '
        f"exit {info_exit_code}; fi\n"
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_make_images_without_an_engine_says_so_and_exits_2(tmp_path):
    # A PATH with neither docker nor podman on it; python itself is called by its full path.
    result = subprocess.run(
        [sys.executable, "-m", "megasft.images", "build"],
        cwd=REPO,
        env={**os.environ, "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == NO_ENGINE_EXIT_CODE
    assert "no container engine can build here, so no image was built" in result.stderr
    assert "docker: not installed; podman: not installed" in result.stderr


def test_a_client_without_its_daemon_is_not_an_engine(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.log"
    fake_engine(tmp_path, "docker", 1, log)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(REPO)
    assert main(["build", "cpu"]) == NO_ENGINE_EXIT_CODE
    message = capsys.readouterr().err
    assert (
        "docker: client found, but `docker info` failed: Cannot connect to the docker daemon"
        in (message)
    )
    assert log.read_text() == "info\n"  # nothing was built


def test_build_tags_each_image_from_images_py_and_pushes_on_request(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    fake_engine(tmp_path, "podman", 0, log)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("MEGASFT_IMAGE_REGISTRY", "ghcr.io/acme")
    monkeypatch.delenv("MEGASFT_IMAGE_TAG", raising=False)
    monkeypatch.delenv("MEGASFT_IMAGE_TRAIN_ROCM", raising=False)
    monkeypatch.delenv("MEGASFT_IMAGE_MLFLOW", raising=False)
    monkeypatch.chdir(REPO)
    assert main(["build", "train-rocm", "mlflow", "--push"]) == 0
    calls = [line.split() for line in log.read_text().splitlines()]
    assert [call[0] for call in calls] == ["info", "build", "push", "build", "push"]
    rocm_build = calls[1]
    assert rocm_build[1:7] == [
        "--file", "docker/Dockerfile.train-rocm",
        "--tag", f"ghcr.io/acme/train-rocm:{__version__}",
        "--platform", "linux/amd64",
    ]  # fmt: skip
    assert f"VERSION={__version__}" in rocm_build and rocm_build[-1] == "."
    assert calls[2] == ["push", f"ghcr.io/acme/train-rocm:{__version__}"]
    assert "--platform" not in calls[3]  # the MLflow image builds for the machine's own platform
