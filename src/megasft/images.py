"""Container image references: the one place the components, the manifests and `make images` read them.

Each image is built from one Dockerfile under docker/ and named REGISTRY/REPOSITORY:TAG (or
@sha256:DIGEST); the defaults live here and `MEGASFT_IMAGE_*` variables override them.

    python -m megasft.images --list            IMAGE<TAB>DOCKERFILE<TAB>REFERENCE, one line per image
    python -m megasft.images build [IMAGE ...] [--push]    (`make images`; exits 2 without an engine)

The variables, the example.com default and the build: docs/deploy.md, "Images".
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from megasft import __version__
from megasft.errors import MegasftError

DEFAULT_REGISTRY = "registry.example.com/megasft"
REGISTRY_VARIABLE = "MEGASFT_IMAGE_REGISTRY"
TAG_VARIABLE = "MEGASFT_IMAGE_TAG"
NO_ENGINE_EXIT_CODE = 2

# The grammar of the distribution spec (github.com/distribution/reference), reduced to what we use.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_REGISTRY_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]+)?")


class ImageError(MegasftError):
    """An image reference or an override of one is malformed, or an image name is unknown."""


@dataclass(frozen=True)
class ImageRef:
    """One image: REGISTRY/REPOSITORY, pinned by a tag, a digest, or both."""

    registry: str
    """Registry host and path, e.g. `ghcr.io/acme/megasft` (everything before the last `/`)."""
    repository: str
    """The last path component, e.g. `train-rocm`."""
    tag: str | None = None
    """e.g. `0.1.0`; None when pinned by digest alone."""
    digest: str | None = None
    """`sha256:` and 64 hex digits; wins over the tag when both are given."""

    def __post_init__(self) -> None:
        host, _, path = self.registry.partition("/")
        components = [*path.split("/"), self.repository] if path else [self.repository]
        if not _REGISTRY_HOST.fullmatch(host) or not all(
            _PATH_COMPONENT.fullmatch(part) for part in components
        ):
            raise ImageError(
                f"{self.registry}/{self.repository} is not a valid image name: a registry host, "
                "then lower-case path components separated by '/'"
            )
        if self.tag is None and self.digest is None:
            raise ImageError(f"{self.registry}/{self.repository} needs a tag or a digest")
        if self.tag is not None and not _TAG.fullmatch(self.tag):
            raise ImageError(f"{self.tag!r} is not a valid image tag")
        if self.digest is not None and not _DIGEST.fullmatch(self.digest):
            raise ImageError(f"{self.digest!r} is not a digest; expected sha256: and 64 hex digits")

    @property
    def reference(self) -> str:
        """What `docker pull` and a pod's `image:` take."""
        name = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            name += f":{self.tag}"
        if self.digest is not None:
            name += f"@{self.digest}"
        return name

    @classmethod
    def parse(cls, reference: str) -> ImageRef:
        """The inverse of `reference`: REGISTRY/REPOSITORY[:TAG][@DIGEST].

        Args:
            reference: an image reference, registry included.

        Returns:
            The parsed reference.

        Raises:
            ImageError: the reference has no registry (or is otherwise invalid).
        """
        name, _, digest = reference.partition("@")
        tag = None
        last_slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > last_slash:  # a colon before the last '/' is a registry port, not a tag
            name, tag = name[:colon], name[colon + 1 :]
        registry, _, repository = name.rpartition("/")
        if not registry:
            raise ImageError(
                f"{reference!r} has no registry; write it in full, e.g. ghcr.io/acme/{name}:TAG"
            )
        return cls(registry, repository, tag, digest or None)


@dataclass(frozen=True)
class Image:
    """One image that `make images` builds: where its Dockerfile is and what it is for."""

    name: str
    dockerfile: str
    """Relative to the repository root, which is also the build context."""
    platform: str | None
    """`--platform` for the build; None builds for the machine's own."""
    description: str

    @property
    def override_variable(self) -> str:
        """The environment variable that replaces this image's whole reference (MEGASFT_IMAGE_<NAME>)."""
        return "MEGASFT_IMAGE_" + self.name.upper().replace("-", "_")


IMAGES: dict[str, Image] = {
    image.name: image
    for image in (
        Image(
            "train-rocm",
            "docker/Dockerfile.train-rocm",
            "linux/amd64",
            "training on AMD MI300X (gfx942): ROCm PyTorch, Transformer Engine, megatron-core",
        ),
        Image(
            "train-cuda",
            "docker/Dockerfile.train-cuda",
            "linux/amd64",
            "training on NVIDIA GPUs: NGC PyTorch, megatron-core",
        ),
        Image(
            "cpu",
            # megatron-core publishes x86_64 wheels only, so the CPU image is amd64 as well.
            "docker/Dockerfile.cpu",
            "linux/amd64",
            "tokenize-and-mask, conversion, evaluation and the pipeline CLI, on CPU",
        ),
        Image(
            "mlflow",
            "docker/Dockerfile.mlflow",
            None,
            "the MLflow tracking server, with the Postgres and S3 clients it needs",
        ),
    )
}


def image_for(name: str, environ: Mapping[str, str] | None = None) -> ImageRef:
    """The reference of image `name`, after the MEGASFT_IMAGE_* overrides.

    Args:
        name: one of IMAGES.
        environ: where the overrides are read (default: os.environ).

    Returns:
        The reference.

    Raises:
        ImageError: an unknown image, or an override that is not a valid reference.
    """
    environ = os.environ if environ is None else environ
    if name not in IMAGES:
        raise ImageError(f"unknown image {name!r}; known: {', '.join(IMAGES)}")
    variable = IMAGES[name].override_variable
    override = environ.get(variable, "").strip()
    if override:
        try:
            return ImageRef.parse(override)
        except ImageError as error:
            raise ImageError(f"{variable}={override!r}: {error}") from None
    registry = environ.get(REGISTRY_VARIABLE, "").strip().rstrip("/") or DEFAULT_REGISTRY
    tag = environ.get(TAG_VARIABLE, "").strip() or __version__
    try:
        return ImageRef(registry, name, tag=tag)
    except ImageError as error:
        raise ImageError(f"{REGISTRY_VARIABLE}/{TAG_VARIABLE}: {error}") from None


def find_container_engine(
    candidates: Sequence[str] = ("docker", "podman"),
) -> tuple[str | None, str]:
    """The first of `candidates` that can build here, or None and what was found instead.

    A client alone is not enough: `docker` without a reachable daemon cannot build, so each
    candidate must answer `info`.

    Args:
        candidates: the engines to try, in order.

    Returns:
        (the engine's path or None, what was found: one finding per candidate).
    """
    findings = []
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            findings.append(f"{name}: not installed")
            continue
        try:
            probe = subprocess.run(
                [path, "info"], capture_output=True, text=True, timeout=30, check=False
            )
        except subprocess.TimeoutExpired:
            findings.append(f"{name}: `{name} info` did not answer within 30 s")
            continue
        if probe.returncode == 0:
            return path, f"{name}: ready"
        reason = (probe.stderr or probe.stdout).strip().splitlines()
        last_line = reason[-1] if reason else f"exit code {probe.returncode}"
        findings.append(f"{name}: client found, but `{name} info` failed: {last_line}")
    return None, "; ".join(findings)


def build_command(engine: str, spec: Image, image: ImageRef, revision: str) -> list[str]:
    """The build command of one image, with the OCI labels' build arguments.

    Args:
        engine: the container engine's path.
        spec: the image to build.
        image: its reference (the tag given to the build).
        revision: the git commit it is built from.

    Returns:
        The command, to run from the repository root.
    """
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = [engine, "build", "--file", spec.dockerfile, "--tag", image.reference]
    if spec.platform:
        command += ["--platform", spec.platform]
    for name, value in (("VERSION", __version__), ("REVISION", revision), ("CREATED", created)):
        command += ["--build-arg", f"{name}={value}"]  # the OCI labels of every image
    return [*command, "."]


def _git_revision() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def build(names: Sequence[str], push: bool = False) -> int:
    """Build (and push) the images `names` from the repository root.

    Args:
        names: images of IMAGES.
        push: push each image after its build.

    Returns:
        The exit code: 0, 1 when a build or push failed, NO_ENGINE_EXIT_CODE (2) when no
        container engine can build here.

    Raises:
        ImageError: an unknown image, a bad override, or a Dockerfile not found (not run from
            the repository root).
    """
    images = {name: image_for(name) for name in names}  # bad names and overrides fail first
    dockerfiles = [IMAGES[name].dockerfile for name in names]
    missing = [path for path in dockerfiles if not os.path.isfile(path)]
    if missing:
        raise ImageError(f"{missing[0]} not found; run this from the repository root")
    engine, findings = find_container_engine()
    if engine is None:
        print(
            "make images: no container engine can build here, so no image was built.\n"
            f"  found: {findings}\n"
            "  Start Docker or install Podman and run `make images` again; "
            "`python -m megasft.images --list` shows what would be built.",
            file=sys.stderr,
        )
        return NO_ENGINE_EXIT_CODE
    revision = _git_revision()
    for name, image in images.items():
        commands = [build_command(engine, IMAGES[name], image, revision)]
        if push:
            commands.append([engine, "push", image.reference])
        for command in commands:
            print("+ " + " ".join(command), flush=True)
            if subprocess.run(command, check=False).returncode != 0:
                print(f"make images: `{' '.join(command[:2])}` failed for {name}", file=sys.stderr)
                return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m megasft.images`: `--list`, or `build [IMAGE ...] [--push]`.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m megasft.images", description="The container images of megasft."
    )
    parser.add_argument(
        "--list", action="store_true", help="print IMAGE<TAB>DOCKERFILE<TAB>REFERENCE per image"
    )
    subcommands = parser.add_subparsers(dest="command")
    build_parser = subcommands.add_parser("build", help="build the images with docker or podman")
    build_parser.add_argument(
        "images", nargs="*", metavar="IMAGE", help=f"default: all ({', '.join(IMAGES)})"
    )
    build_parser.add_argument("--push", action="store_true", help="push each image after its build")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            return build(args.images or list(IMAGES), push=args.push)
        if args.list:
            for spec in IMAGES.values():
                print(f"{spec.name}\t{spec.dockerfile}\t{image_for(spec.name).reference}")
            return 0
    except ImageError as error:
        print(f"megasft images: error: {error}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
