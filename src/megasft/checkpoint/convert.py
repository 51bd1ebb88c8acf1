"""The checkpoint-convert stage: `convert()`, HF <-> megatron-core, in either direction.

The output is written into a temporary directory beside the target and renamed into place
only when complete, so a failed or interrupted conversion never leaves a half-written target.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.hf_to_megatron import convert_hf_to_megatron
from megasft.checkpoint.layout import ARCHITECTURE_FILE, DEFAULT_MAX_SHARD_BYTES, FORMATS
from megasft.checkpoint.megatron_to_hf import convert_megatron_to_hf
from megasft.megatron.architecture import ModelArchitecture

logger = logging.getLogger(__name__)


def convert(
    source_format: str,
    target_format: str,
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    allow_pytorch_bin: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    adapter_only: bool = False,
) -> ModelArchitecture:
    """Convert the checkpoint in `source` to `target_format` in `destination`.

    Args:
        source_format: "hf" or "megatron".
        target_format: the other one.
        source: an HF model directory (config.json, safetensors, tokenizer) or a megasft
            megatron checkpoint directory.
        destination: must not exist yet.
        base: megatron -> hf only: an HF model directory whose config.json,
            generation_config.json and tokenizer are written with the weights (its
            architecture must match); by default the copies stored at import are used.
        allow_pytorch_bin: hf -> megatron only: read `pytorch_model.bin` weights (with
            `torch.load(weights_only=True)`) when there are no safetensors.
        max_shard_bytes: megatron -> hf only: the size above which safetensors are sharded.
        adapter_only: megatron -> hf of a PEFT run only: write a Hugging Face PEFT adapter
            instead of the merged model (both need `base`).

    Returns the model's architecture. Raises `CheckpointError` / `ConfigError` for bad input.
    """
    if {source_format, target_format} != set(FORMATS):
        raise CheckpointError(
            f"cannot convert from {source_format!r} to {target_format!r}; use --from hf "
            "--to megatron or --from megatron --to hf"
        )
    if base is not None and target_format != "hf":
        raise CheckpointError("--base applies to --to hf only")
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise CheckpointError(f"{source}: source directory does not exist")
    if destination.exists():
        raise CheckpointError(
            f"{destination}: already exists; choose a new --dst or remove it first"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    peft_checkpoint = _peft_checkpoint(source) if source_format == "megatron" else None
    if adapter_only and peft_checkpoint is None:
        raise CheckpointError(
            f"--adapter-only: {source} is not a PEFT run (no adapters in its train_state.json)"
        )
    if peft_checkpoint is not None and base is None:
        raise CheckpointError(
            f"--base is required: {source} holds adapters only; pass the Hugging Face model "
            "the run's --load was converted from"
        )

    started = time.monotonic()
    with _staging_directory(destination) as staging:
        if peft_checkpoint is not None:
            from megasft.checkpoint import peft_export

            write = peft_export.write_peft_adapter if adapter_only else (
                peft_export.write_merged_model)  # fmt: skip
            write(peft_checkpoint, staging, Path(base))
            architecture = ModelArchitecture.load(peft_checkpoint / ARCHITECTURE_FILE)
        elif target_format == "megatron":
            architecture = convert_hf_to_megatron(
                source, staging, allow_pytorch_bin=allow_pytorch_bin
            )
        else:
            architecture = convert_megatron_to_hf(
                source,
                staging,
                base=Path(base) if base is not None else None,
                max_shard_bytes=max_shard_bytes,
            )
        _move_into_place(staging, destination)
    logger.info(
        "converted %s (%s) %s -> %s in %.1fs",
        source,
        architecture.family,
        source_format,
        target_format,
        time.monotonic() - started,
    )
    return architecture


def _peft_checkpoint(source: Path) -> Path | None:
    """The checkpoint of a PEFT run in `source` (an iter_* directory, or a run's --save
    directory: its newest checkpoint), or None when `source` is not one."""
    from megasft.checkpoint.layout import peft_settings_of

    latest = source / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        source = source / f"iter_{int(latest.read_text()):07d}"
    return source if peft_settings_of(source) is not None else None


@contextlib.contextmanager
def _staging_directory(destination: Path) -> Iterator[Path]:
    """A fresh directory next to `destination` (same filesystem, so the final rename is
    atomic), removed on exit unless it was moved into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, destination: Path) -> None:
    os.chmod(staging, 0o755)  # mkdtemp creates 0700
    try:
        # rename() refuses a non-empty existing target, so a target created meanwhile is kept.
        staging.rename(destination)
    except OSError as error:
        raise CheckpointError(
            f"{destination}: cannot move the result into place: {error}"
        ) from error
