"""The steps before training: validate, tokenize-and-mask, checkpoint-convert, record-inputs.

Each takes its configuration sections and KFP artifacts and calls its stage's public function.
See docs/pipeline.md (the steps, caching, MLflow).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megasft.launch.registry import launcher_section
from megasft.pipeline.config import PipelineConfig, check_inputs, memory_plan, prepare_settings
from megasft.pipeline.steps.common import (
    PIPELINE_NAME,
    ArtifactLike,
    combine_digests,
    content_digest,
    experiment_name,
    write_artifact,
    yaml_text,
)

PEFT_ADAPTER_DIR = "peft-adapter"
"""Where a LoRA run's export puts its Hugging Face PEFT adapter, inside the merged model."""

# -- validate -------------------------------------------------------------------------------


def validate(
    sections: dict[str, Any], *, kfp_run_id: str, plan: ArtifactLike
) -> tuple[str, str, str, str, str]:
    """Check the configuration against its inputs and open the MLflow parent run.

    Args:
        sections: the pipeline's parameters, one dict per configuration section.
        kfp_run_id: the KFP run's id (tags the MLflow parent run).
        plan: the Markdown artifact that records the inputs, their digests and the config.

    Returns:
        (parent MLflow run id or "", data digest, model digest, data path, base model path):
        the digests are the content hashes that key the cache of the steps that read those
        inputs.

    Raises:
        ConfigError: a setting is invalid or does not fit its inputs.
    """
    from megasft import __version__, tracking

    config = PipelineConfig.from_arguments(**sections)
    hf_config = check_inputs(config)
    data_digest = content_digest(config.data["path"])
    model_digest = content_digest(config.model["path"])
    if config.model.get("tokenizer"):
        model_digest = combine_digests(model_digest, content_digest(config.model["tokenizer"]))
    parent = tracking.start_pipeline_run(
        config.tracking.uri,
        experiment_name(config),
        run_name=f"{config.name}-{kfp_run_id[:8]}",
        tags={
            "kfp.run_id": kfp_run_id,
            "kfp.pipeline_name": PIPELINE_NAME,
            "kfp.pipeline_version": __version__,
            "megasft.config": config.name,
        },
        params=_typed_sections(config),
    )
    write_artifact(
        plan,
        _plan_markdown(config, hf_config, data_digest, model_digest)
        + _memory_markdown(memory_plan(config, hf_config)),
        metadata={"config": config.name, "data_sha256": data_digest, "model_sha256": model_digest},
    )
    return (
        parent or "",
        data_digest,
        model_digest,
        str(config.data["path"]),
        str(config.model["path"]),
    )


def _typed_sections(config: PipelineConfig) -> dict[str, Any]:
    """The sections with each stage's settings typed as the stage takes them (KFP turns every
    number of a dict parameter into a double: 4 would be logged as 4.0)."""
    return {
        "data": {"path": config.data["path"], **config.prepare_settings()},
        "model": config.model,
        "train": config.train_settings(),
        "launcher": launcher_section(config.launcher),
        "evaluate": config.evaluate_settings(),
    }


def _memory_markdown(memory) -> str:
    """`megasft plan`'s report of the training step, when the train section names its GPU."""
    if memory is None:
        return "\nMemory plan: none (the train section names no `device`).\n"
    from megasft.plan.report import report

    return f"\n## Memory per GPU (megasft plan)\n\n```\n{report(memory)}```\n"


def _plan_markdown(
    config: PipelineConfig, hf_config: dict, data_digest: str, model_digest: str
) -> str:
    lines = [
        f"# megasft run: {config.name}",
        config.description,
        "",
        "| input | path | sha256 |",
        "|---|---|---|",
        f"| data | `{config.data['path']}` | `{data_digest[:16]}` |",
        f"| base model ({hf_config.get('model_type', '?')}) | `{config.model['path']}` "
        f"| `{model_digest[:16]}` |",
        "",
        "```yaml",
        yaml_text(config.arguments()),
        "```",
    ]
    return "\n".join(lines) + "\n"


# -- tokenize-and-mask ------------------------------------------------------------------------


def tokenize_and_mask(
    data: dict[str, Any],
    model: dict[str, Any],
    *,
    dataset: ArtifactLike,
    preview: ArtifactLike,
    metrics: Any,
) -> dict[str, Any]:
    """`megasft prepare` of the data section into the Dataset artifact.

    Args:
        data: the `data` section (the path and the settings of `megasft prepare`).
        model: the `model` section (its tokenizer, else its path, tokenizes).
        dataset: the Dataset artifact the prepared data goes into.
        preview: the HTML artifact for the mask preview.
        metrics: the KFP Metrics artifact (anything with `log_metric`).

    Returns:
        The dataset's manifest.

    Raises:
        ConfigError: the data cannot be read or prepared as configured.
    """
    from megasft.data.prepare import PrepareConfig, prepare

    manifest = prepare(
        PrepareConfig(
            inputs=(str(data["path"]),),
            tokenizer=str(model.get("tokenizer") or model["path"]),
            output=dataset.path,
            overwrite=True,  # a retried step finds its own earlier attempt there
            progress=False,
            **prepare_settings(data),
        )
    )
    figures = dataset_figures(manifest)
    dataset.metadata.update(figures)
    shutil.copyfile(Path(dataset.path) / "preview.html", preview.path)
    for key, value in figures.items():
        if isinstance(value, int | float):
            metrics.log_metric(key, value)
    return manifest


def dataset_figures(manifest: dict[str, Any]) -> dict[str, Any]:
    """The key figures of a prepared dataset, as the UI and MLflow show them.

    Args:
        manifest: the dataset's manifest.

    Returns:
        Examples, rejected, train and val rows, tokens, loss tokens, packing efficiency.
    """
    train = manifest["splits"].get("train", {})
    val = manifest["splits"].get("val", {})
    return {
        "examples": manifest["examples"],
        "rejected": manifest["rejected"]["total"],
        "train_rows": train.get("rows", 0),
        "val_rows": val.get("rows", 0),
        "tokens": manifest["tokens"],
        "loss_tokens": manifest["loss_tokens"],
        "packing_efficiency": manifest["packing_efficiency"],
    }


# -- checkpoint-convert -----------------------------------------------------------------------


def checkpoint_convert(
    direction: str,
    *,
    source: str,
    output: ArtifactLike,
    base: str | None = None,
    tracking_section: dict[str, Any] | None = None,
    parent_run_id: str = "",
) -> dict[str, Any]:
    """`megasft convert` in either direction: hf-to-megatron or megatron-to-hf.

    For megatron-to-hf, `source` may be a training output (its newest complete checkpoint is
    exported) and `base` the HF model whose config and tokenizer go with the weights. With a
    parent run, the conversion is recorded as a nested MLflow run (the export after training;
    the cached import before it is recorded by `record_inputs`).

    Args:
        direction: "hf-to-megatron" or "megatron-to-hf".
        source: the checkpoint (or training output) to convert.
        output: the Model artifact the converted checkpoint goes into.
        base: the HF model whose config and tokenizer go with exported weights.
        tracking_section: the pipeline's `tracking` section.
        parent_run_id: the MLflow parent run ("" for none).

    Returns:
        The figures shown beside the artifact (family, layers, hidden size, format).

    Raises:
        ConfigError: an unknown direction, or a checkpoint the converter refuses.
    """
    from megasft import tracking
    from megasft.checkpoint.convert import convert
    from megasft.checkpoint.layout import peft_settings_of
    from megasft.errors import ConfigError
    from megasft.train.checkpointing import latest_checkpoint

    if direction not in ("hf-to-megatron", "megatron-to-hf"):
        raise ConfigError(f"direction {direction!r}: use hf-to-megatron or megatron-to-hf")
    source_format, target_format = direction.split("-to-")
    if source_format == "megatron":
        source = str(latest_checkpoint(source) or source)
    destination = Path(output.path)
    if destination.exists():  # a retried step's earlier attempt
        shutil.rmtree(destination)
    uri = (tracking_section or {}).get("uri")
    with tracking.step_run(
        uri,
        parent_run_id or None,
        "export" if target_format == "hf" else "checkpoint-convert",
        params={"direction": direction, "source": source, "base": base or ""},
    ) as run:
        architecture = convert(source_format, target_format, source, destination, base=base)
        figures = {
            "family": architecture.family,
            "layers": architecture.num_layers,
            "hidden_size": architecture.hidden_size,
            "format": target_format,
        }
        if target_format == "hf" and peft_settings_of(Path(source)) is not None:
            # A LoRA run: `destination` is the merged model (what gets registered); the
            # Hugging Face PEFT adapter goes beside it, and into MLflow as an artifact.
            adapter = destination / PEFT_ADAPTER_DIR
            convert("megatron", "hf", source, adapter, base=base, adapter_only=True)
            run.log_artifact(adapter, "adapter")
            figures["adapter"] = PEFT_ADAPTER_DIR
        run.log_params(figures)
    output.metadata.update(figures)
    return figures


# -- record the cached steps in MLflow --------------------------------------------------------


def record_inputs(
    tracking_section: dict[str, Any],
    *,
    parent_run_id: str,
    data_path: str,
    data_digest: str,
    model_path: str,
    model_digest: str,
    dataset: ArtifactLike,
    base_checkpoint: ArtifactLike,
) -> list[str]:
    """The nested MLflow runs of tokenize-and-mask and checkpoint-convert (cached steps).

    Args:
        tracking_section: the pipeline's `tracking` section.
        parent_run_id: the MLflow parent run ("" for none).
        data_path: where the training data came from.
        data_digest: its sha256 (from `validate`).
        model_path: where the base model came from.
        model_digest: its sha256 (from `validate`).
        dataset: the prepared Dataset artifact.
        base_checkpoint: the converted base checkpoint's artifact.

    Returns:
        What could not be logged (empty when everything was).
    """
    from megasft import tracking

    uri = tracking_section.get("uri")
    unlogged: list[str] = []
    manifest = json.loads((Path(dataset.path) / "manifest.json").read_text(encoding="utf-8"))
    with tracking.step_run(
        uri,
        parent_run_id or None,
        "tokenize-and-mask",
        params={"data": manifest["settings"]},
        tags={"data.sha256": data_digest},
    ) as run:
        run.log_metrics(
            {k: v for k, v in dataset_figures(manifest).items() if isinstance(v, int | float)}
        )
        run.log_dataset(
            dataset.path, name="sft-data", context="training", source=data_path, digest=data_digest
        )
        for name in ("manifest.json", "preview.html", "rejects.jsonl"):
            if (Path(dataset.path) / name).exists():
                run.log_artifact(Path(dataset.path) / name, "dataset")
        unlogged += run.unlogged
    with tracking.step_run(
        uri,
        parent_run_id or None,
        "checkpoint-convert",
        params={"direction": "hf-to-megatron", "source": model_path},
        tags={"model.sha256": model_digest},
    ) as run:
        run.log_params({key: str(value) for key, value in base_checkpoint.metadata.items()})
        unlogged += run.unlogged
    return unlogged
