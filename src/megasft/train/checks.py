"""Everything about a training run that can be checked before any heavy work starts.

`plan_run` reads the dataset's manifest and the checkpoint's architecture.json (small files),
checks every setting against them, and resolves what follows from them (the number of steps
for `--epochs`, the sequence length, whether to resume). It imports neither torch.distributed
nor megatron-core, so a bad setting fails within a second, naming the setting, and before
`--nproc` starts any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from megasft.checkpoint.layout import ARCHITECTURE_FILE
from megasft.data.store import MANIFEST_FILE, open_split, read_manifest
from megasft.errors import ConfigError, InputError
from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.attention import AttentionPlan, choose_attention, transformer_engine_installed
from megasft.train.checkpointing import latest_checkpoint
from megasft.train.config import TrainConfig, check_against_experts, check_against_model
from megasft.train.data import steps_for_epochs
from megasft.train.resume import check_resume


@dataclass(frozen=True)
class RunPlan:
    """A checked configuration and what was read to check it."""

    config: TrainConfig
    """The settings, with `train_iters` resolved from `epochs` when that was given."""
    architecture: ModelArchitecture
    seq_length: int
    """Tokens per row of the dataset (from its manifest)."""
    train_rows: int
    val_rows: int
    data_fingerprint: str
    """sha256 of the dataset's manifest: a resumed run must train on the same data."""
    resume_from: Path | None
    """The newest checkpoint in `--save`, when there is one."""
    attention: AttentionPlan
    """The core attention (--attention resolved for this machine) and the batches' layout."""
    distributed_optimizer: bool
    """--distributed-optimizer resolved: by default on with an accelerator, off on CPU."""


def plan_run(config: TrainConfig, *, on_accelerator: bool) -> RunPlan:
    """Check `config` against the data, the model, this machine and the checkpoint it resumes.

    Args:
        config: the settings.
        on_accelerator: a CUDA/ROCm device is visible.

    Returns:
        The checked plan.

    Raises:
        ConfigError, InputError: naming the setting or input and what to do.
    """
    if config.require_accelerator and not on_accelerator:
        raise ConfigError(
            "--require-accelerator: this process sees no CUDA or ROCm device (torch.cuda."
            "is_available() is False; CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES="
            f"{_visible_devices()!r}), and the job asked for GPUs. Check the node's GPU driver "
            "and device plugin and the pod's GPU request; to train on the CPU on purpose, "
            "leave --require-accelerator out"
        )
    attention = choose_attention(
        config.attention,
        precision=config.precision,
        on_accelerator=on_accelerator,
        transformer_engine=transformer_engine_installed(),
    )
    data = Path(config.data)
    if not data.is_dir():
        raise InputError(f"--data {data}: no such directory (a `megasft prepare` output)")
    manifest = read_manifest(data)
    seq_length = int(manifest["settings"]["seq_length"])
    train_rows = open_split(data, "train").num_rows
    if train_rows == 0:
        raise InputError(f"--data {data}: the train split is empty")
    val_rows = open_split(data, "val").num_rows
    if config.eval_interval and not val_rows:
        raise ConfigError(
            f"--eval-interval {config.eval_interval} needs validation data, but the val split "
            f"of {data} is empty; prepare it with --val-fraction above 0, or set "
            "--eval-interval 0"
        )

    load = Path(config.load)
    if not (load / ARCHITECTURE_FILE).is_file():
        raise InputError(
            f"--load {load}: no {ARCHITECTURE_FILE}; pass a megatron checkpoint made by "
            "`megasft convert --from hf --to megatron` (or an iter_* directory of a run)"
        )
    architecture = ModelArchitecture.load(load / ARCHITECTURE_FILE)
    check_against_model(
        config,
        {
            "num_attention_heads": architecture.num_attention_heads,
            "num_key_value_heads": architecture.num_query_groups,
            "num_hidden_layers": architecture.num_layers,
            "max_position_embeddings": architecture.max_position_embeddings,
        },
        seq_length,
    )
    check_against_experts(config, architecture)
    chunk_layers = architecture.num_layers // (
        config.pipeline_parallel * (config.virtual_pipeline_stages or 1)
    )
    if config.recompute_layers is not None and config.recompute_layers > chunk_layers:
        raise ConfigError(
            f"--recompute-layers {config.recompute_layers} is more than the {chunk_layers} "
            "layers of each pipeline stage (model chunk)"
        )
    tp = config.tensor_parallel
    for name, value in (
        ("intermediate_size", architecture.ffn_hidden_size),
        ("padded vocabulary", architecture.padded_vocab_size),
    ):
        if value % tp:
            raise ConfigError(f"--tp {tp} does not divide the model's {name} ({value})")
    tokenizer_vocab = manifest.get("tokenizer", {}).get("vocab_size")
    if tokenizer_vocab and tokenizer_vocab > architecture.vocab_size:
        raise ConfigError(
            f"the dataset's tokenizer has {tokenizer_vocab} tokens, more than the model's "
            f"vocab_size {architecture.vocab_size}: it was prepared with another model's "
            f"tokenizer ({manifest['tokenizer'].get('path')})"
        )
    _check_device_features(config, attention, on_accelerator)

    train_iters = config.train_iters
    if train_iters is None:
        train_iters = steps_for_epochs(config.epochs, train_rows, config.global_batch_size)
        if config.warmup_iters >= train_iters:
            raise ConfigError(
                f"--warmup-iters {config.warmup_iters} must be below the {train_iters} steps "
                f"of --epochs {config.epochs}"
            )
    save = Path(config.save)
    if save.exists() and not save.is_dir():
        raise InputError(f"--save {save}: exists and is not a directory")
    fingerprint = hashlib.sha256((data / MANIFEST_FILE).read_bytes()).hexdigest()
    config = dataclasses.replace(config, train_iters=train_iters, epochs=None)
    distributed_optimizer = (
        on_accelerator if config.distributed_optimizer is None else config.distributed_optimizer
    )
    resume_from = latest_checkpoint(save)
    if resume_from is not None:
        check_resume(resume_from, config, distributed_optimizer=distributed_optimizer)
    return RunPlan(
        config=config,
        architecture=architecture,
        seq_length=seq_length,
        train_rows=train_rows,
        val_rows=val_rows,
        data_fingerprint=fingerprint,
        resume_from=resume_from,
        attention=attention,
        distributed_optimizer=distributed_optimizer,
    )


def _visible_devices() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("HIP_VISIBLE_DEVICES"))


def _check_device_features(
    config: TrainConfig, attention: AttentionPlan, on_accelerator: bool
) -> None:
    """Features that need a GPU, or Transformer Engine on one, refused early elsewhere."""
    if on_accelerator:
        import torch

        if config.nproc > torch.cuda.device_count():
            raise ConfigError(
                f"--nproc {config.nproc} processes per node, but this node has "
                f"{torch.cuda.device_count()} GPUs; use at most one process per GPU"
            )
    if config.fp8 != "none":
        import importlib.util

        if not on_accelerator:
            raise ConfigError(
                f"--fp8 {config.fp8} needs GPUs with Transformer Engine: megatron-core's local "
                "layers, which run on CPU, have no FP8; use --fp8 none here"
            )
        if importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError(
                f"--fp8 {config.fp8} needs Transformer Engine, which is not installed here "
                "(the training images have it); use --fp8 none"
            )
    if config.attention_dropout and attention.backend == "torch" and attention.packed:
        raise ConfigError(
            f"--attention-dropout {config.attention_dropout}: the torch attention has none on "
            "packed documents (GPUs); use --attention te, or --attention-dropout 0"
        )
    if config.context_parallel > 1:
        if attention.backend != "te":
            raise ConfigError(
                "--cp above 1 needs GPUs with Transformer Engine (--attention te: the torch "
                "attention has no context parallelism); use --cp 1 here"
            )
        if config.pipeline_parallel > 1:
            raise ConfigError(
                "--cp above 1 with --pp above 1 is not supported: packed documents are padded "
                "per context-parallel chunk, so the pipeline's tensor shapes would vary"
            )
