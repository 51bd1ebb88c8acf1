"""What the pipeline steps share: the pipeline's name, the artifact protocol, and small helpers.

See docs/pipeline.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

from megasft.pipeline.config import PipelineConfig

PIPELINE_NAME = "megasft-sft"
"""The pipeline's name in Kubeflow and in MLflow's tags."""


class ArtifactLike(Protocol):
    """A KFP artifact as the steps use it: where it lives and the figures the UI shows beside it
    (a test passes any object with these)."""

    path: str
    metadata: dict[str, Any]


def experiment_name(config: PipelineConfig) -> str:
    """The MLflow experiment of a run of `config`.

    Args:
        config: the pipeline configuration.

    Returns:
        `tracking.experiment`, else `megasft-<config name>`.
    """
    return experiment_name_from(config.arguments()["tracking"], config.name)


def experiment_name_from(tracking_section: dict[str, Any], config_name: str) -> str:
    """The MLflow experiment named by a `tracking` section, as a step receives it.

    Args:
        tracking_section: the pipeline's `tracking` section.
        config_name: the configuration's name.

    Returns:
        The section's `experiment`, else `megasft-<config_name>`.
    """
    return tracking_section.get("experiment") or f"megasft-{config_name}"


def content_digest(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over a directory's files (relative names and bytes).

    Args:
        path: a file or a directory.

    Returns:
        The hex digest; it keys the KFP cache of the steps that read `path`.

    Raises:
        OSError: a file cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def combine_digests(*digests: str) -> str:
    """One sha256 (hex) standing for several, in order (the model with its own tokenizer)."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def yaml_text(values: dict[str, Any]) -> str:
    """`values` as YAML, keys in their order, without a trailing newline.

    Args:
        values: plain data (dicts, lists, scalars).

    Returns:
        The YAML text.
    """
    import yaml

    return yaml.safe_dump(values, sort_keys=False).rstrip()


def write_artifact(artifact: ArtifactLike, text: str, metadata: dict[str, Any]) -> None:
    """Write `text` as the artifact's file and add `metadata` to the figures the UI shows.

    Args:
        artifact: the KFP artifact (or a stand-in).
        text: the file's content (UTF-8).
        metadata: figures to show beside the artifact.
    """
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(text, encoding="utf-8")
    artifact.metadata.update(metadata)
