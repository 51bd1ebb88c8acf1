"""Reading docker/Dockerfile.* with dockerfile-parse: stages, their base images and instructions."""

from __future__ import annotations

import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from dockerfile_parse import DockerfileParser

from tests.conftest import REPO

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


@dataclass(frozen=True)
class Stage:
    name: str | None
    base: str
    """The FROM reference with the global ARGs' defaults substituted."""
    instructions: tuple[dict, ...]
    """dockerfile-parse's entries (instruction, value, startline, ...) after the FROM line."""

    def values(self, instruction: str) -> list[str]:
        return [
            entry["value"] for entry in self.instructions if entry["instruction"] == instruction
        ]


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    parser: DockerfileParser
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def global_args(self) -> dict[str, str]:
        """ARG defaults declared before the first FROM."""
        args = {}
        for entry in self.parser.structure:
            if entry["instruction"] == "FROM":
                break
            if entry["instruction"] == "ARG":
                name, _, default = entry["value"].partition("=")
                args[name.strip()] = default.strip()
        return args


def parse(path: Path) -> Dockerfile:
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))  # re-read lazily, so in memory
    structure = parser.structure
    bases = parser.parent_images
    stages: list[Stage] = []
    current: list[dict] = []
    names: list[str | None] = []
    for entry in structure:
        if entry["instruction"] == "FROM":
            if names:
                stages.append(Stage(names[-1], bases[len(stages)], tuple(current)))
            match = re.search(r"\s+AS\s+(\S+)\s*$", entry["value"], flags=re.IGNORECASE)
            names.append(match.group(1) if match else None)
            current = []
        elif names:
            current.append(entry)
    stages.append(Stage(names[-1], bases[len(stages)], tuple(current)))
    return Dockerfile(path, parser, tuple(stages))


def copy_sources(value: str) -> list[str] | None:
    """The sources of a COPY/ADD from the build context; None for a copy from another stage."""
    words = shlex.split(value)
    flags = [word for word in words if word.startswith("--")]
    if any(flag.startswith("--from=") for flag in flags):
        return None
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1]  # the last one is the destination


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out, by .dockerignore's rules.

    The last pattern that matches the path or one of its parent directories decides; `!` re-includes.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
