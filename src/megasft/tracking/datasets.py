"""What a step's MLflow run records about data: a dataset input ("Datasets used") with its
source, digest, schema and profile, as `StepRun.log_dataset` sends it."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_DIGEST_LENGTH = 32  # of MLflow's 36, without an "sha256:"-style prefix


def mlflow_digest(digest: str) -> str:
    """The digest as MLflow stores it (at most 36 characters): short ones as they are, long ones
    without an "algorithm:" prefix, cut to their first 32 characters."""
    if len(digest) <= 36:
        return digest
    return digest.split(":", 1)[-1][:MAX_DIGEST_LENGTH]


def dataset_source(source: str) -> tuple[str, str]:
    """(source type, source JSON) as mlflow.data describes `source`: local, s3, gs, http, ...;
    "external" with the URI for schemes it has no resolver for (hf://, ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    if "://" not in source:
        source = str(Path(source).absolute())
    try:
        with warnings.catch_warnings():  # local paths match two resolvers, both the same class
            warnings.simplefilter("ignore")
            resolved = resolve_dataset_source(source)
    except MlflowException:
        return "external", json.dumps({"uri": source})
    return resolved._get_source_type(), resolved.to_json()


def dataset_description(path: Path) -> tuple[Callable[[], str] | None, dict[str, Any]]:
    """(schema JSON maker or None, profile) of a prepared dataset directory or a raw file."""
    if path.is_file():
        return None, {"bytes": path.stat().st_size}
    from megasft.data.store import read_manifest

    manifest = read_manifest(path)  # InputError for a directory that is no `prepare` output
    profile = {
        key: manifest.get(key)
        for key in ("examples", "tokens", "loss_tokens", "packing_efficiency", "rows_read")
    }
    profile["rejected"] = (manifest.get("rejected") or {}).get("total")
    profile["splits"] = {
        split: {key: stats.get(key) for key in ("rows", "examples", "tokens", "loss_tokens")}
        for split, stats in (manifest.get("splits") or {}).items()
    }
    profile["sources"] = [
        {"path": source.get("path"), "sha256": source.get("sha256")}
        for source in manifest.get("sources") or []
    ]
    return example_schema_json, profile


def example_schema_json() -> str:
    """EXAMPLE_SCHEMA (the Arrow rows) as an MLflow schema, in the JSON form mlflow.data uses."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    from megasft.data.store import EXAMPLE_SCHEMA

    columns = []
    for field in EXAMPLE_SCHEMA:
        if not (pa.types.is_list(field.type) and pa.types.is_integer(field.type.value_type)):
            raise TypeError(f"no MLflow type for the Arrow column {field.name}: {field.type}")
        columns.append(ColSpec(Array(DataType.integer), field.name))
    return json.dumps({"mlflow_colspec": Schema(columns).to_dict()})
