"""What each pipeline step does: the one call each KFP component makes into megasft.

A step takes its configuration sections (plain dicts, as the pipeline passes them) and its KFP
artifacts, and does its stage's work with the stage's own public function. KFP artifacts are
used only through `.path` (where the step reads or writes), `.metadata` (figures the Kubeflow UI
shows beside the artifact) and, for Metrics, `.log_metric`, so any object with those works:
the tests call the steps directly with plain stand-ins, and the components pass KFP's.

MLflow: the first step (`validate`) opens the pipeline's parent run and returns its id; every
later step records itself as a nested run under it (megasft.tracking). tokenize-and-mask and the
hf -> megatron conversion are cached by content in KFP, and a cached step does not run, so
their MLflow records are written by `record_inputs`, an uncached step that reads their outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

from megasft.launch.registry import TrainingPlan, launcher_from_settings, launcher_section
from megasft.pipeline.config import (
    PipelineConfig,
    check_inputs,
    evaluate_settings,
    prepare_settings,
    tracking_config,
    train_settings,
)

PIPELINE_NAME = "megasft-sft"
"""The pipeline's name in Kubeflow and in MLflow's tags."""


class ArtifactLike(Protocol):
    path: str
    metadata: dict[str, Any]


# -- validate -------------------------------------------------------------------------------


def validate(
    sections: dict[str, Any], *, kfp_run_id: str, plan: ArtifactLike
) -> tuple[str, str, str, str, str]:
    """Check the configuration against its inputs and open the MLflow parent run.

    Returns (parent MLflow run id or "", data digest, model digest, data path, base model
    path): the
    digests are the content hashes that key the cache of the steps that read those inputs.
    """
    from megasft import __version__, tracking

    config = PipelineConfig.from_arguments(**sections)
    hf_config = check_inputs(config)
    data_digest = content_digest(config.data["path"])
    model_digest = content_digest(config.model["path"])
    if config.model.get("tokenizer"):
        model_digest = _combine(model_digest, content_digest(config.model["tokenizer"]))
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
    _write(
        plan,
        _plan_markdown(config, hf_config, data_digest, model_digest),
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
        _yaml(config.arguments()),
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
    """`megasft prepare` of the data section into the Dataset artifact; returns the manifest."""
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
    """The key figures of a prepared dataset, as the UI and MLflow show them."""
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
    """
    from megasft import tracking
    from megasft.checkpoint.convert import convert
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

    Returns what could not be logged."""
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


# -- train ------------------------------------------------------------------------------------


def train(
    train_section: dict[str, Any],
    launcher: dict[str, Any],
    tracking_section: dict[str, Any],
    *,
    config_name: str,
    kfp_run_id: str,
    parent_run_id: str,
    dataset: ArtifactLike,
    base_checkpoint: ArtifactLike,
    checkpoints: ArtifactLike,
    metrics: Any,
) -> dict[str, Any]:
    """SFT on megatron-core, where the `launcher` section says (megasft.launch.registry).

    Checkpoints go where the launcher keeps them across attempts (the Model artifact, or the
    cluster's workspace volume), so a retried step resumes from the newest checkpoint instead
    of starting over. Returns the training summary.
    """
    from megasft import tracking

    values = training_settings(train_section, tracking_section, config_name)
    uri = tracking_section.get("uri")
    # No params here: the training run logs its whole configuration into this run itself.
    # Rank 0 of the training processes logs its per-step metrics into this nested run.
    with (
        tracking.step_run(uri, parent_run_id or None, "train") as run,
        tracking.training_tracking(uri, run.run_id),
    ):
        plan = TrainingPlan(
            settings=values,
            dataset=Path(dataset.path),
            base_checkpoint=Path(base_checkpoint.path),
            output=Path(checkpoints.path),
            run_id=kfp_run_id,
        )
        summary = launcher_from_settings(launcher).run(plan)
        figures = train_figures(summary)
        run.log_metrics({k: v for k, v in figures.items() if isinstance(v, int | float)})
        for name in ("summary.json", "metrics.jsonl"):
            if (Path(checkpoints.path) / name).exists():
                run.log_artifact(Path(checkpoints.path) / name, "training")
    checkpoints.metadata.update(figures)
    for key, value in figures.items():
        if isinstance(value, int | float):
            metrics.log_metric(key, value)
    if summary.get("status") != "completed":
        from megasft.errors import MegasftError

        raise MegasftError(
            f"training ended with status {summary.get('status')!r}; retry the step to resume "
            "from its latest checkpoint"
        )
    return summary


def training_settings(
    train_section: dict[str, Any], tracking_section: dict[str, Any], config_name: str
) -> dict[str, Any]:
    """The train step's TrainConfig settings (its plan's): the `train` section's, a recipe's
    first, with the tracking server and experiment. `megasft pipeline render-job` uses them too."""
    values = train_settings(train_section)
    values.update(
        tracking_uri=tracking_section.get("uri"),
        experiment=experiment_name_from(tracking_section, config_name),
    )
    return values


def train_figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "steps",
        "final_loss",
        "final_val_loss",
        "skipped_steps",
        "tokens",
        "target_tokens",
        "tokens_per_second",
        "tflops_per_device",
        "mfu",
    )
    return {key: summary[key] for key in keys if summary.get(key) is not None}


# -- evaluate ---------------------------------------------------------------------------------


def evaluate(
    evaluate_section: dict[str, Any],
    model: dict[str, Any],
    tracking_section: dict[str, Any],
    *,
    parent_run_id: str,
    tuned: ArtifactLike,
    dataset: ArtifactLike,
    checkpoints: ArtifactLike,
    metrics: Any,
    report: ArtifactLike,
) -> bool:
    """Tuned vs base on the held-out prompts (and validation loss on the val split); returns
    whether the gate passed (True when no gate is set)."""
    from megasft import tracking
    from megasft.evaluate import EvaluateConfig
    from megasft.evaluate import evaluate as run_evaluation

    settings = evaluate_settings(evaluate_section)
    prompts = settings.pop("data", None)
    output = Path(tempfile.mkdtemp(prefix="megasft-evaluate-")) / "evaluation"
    training_log = Path(checkpoints.path) / "metrics.jsonl"
    with tracking.step_run(
        tracking_section.get("uri"), parent_run_id or None, "evaluate", params=settings
    ) as run:
        result = run_evaluation(
            EvaluateConfig(
                model=tuned.path,
                baseline=model["path"],
                data=prompts or dataset.path,
                output=str(output),
                val_data=dataset.path if prompts else None,
                tokenizer=model.get("tokenizer"),
                training_log=str(training_log) if training_log.is_file() else None,
                **settings,
            )
        )
        # An lm-eval task's metric is named METRIC,FILTER; MLflow refuses commas in metric
        # names, so the trackers get METRIC/FILTER (metrics.json and the gate keep the comma).
        figures = {
            key.replace(",", "/"): value
            for key, value in result["summary"].items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        run.log_metrics(figures)
        for name in ("metrics.json", "report.html", "samples.jsonl"):
            if (output / name).exists():
                run.log_artifact(output / name, "evaluation")
    shutil.copyfile(output / "report.html", report.path)
    gate = result.get("gate")
    passed = True if gate is None else bool(gate["passed"])
    for key, value in figures.items():
        metrics.log_metric(key, value)
    metrics.log_metric("gate_passed", int(passed))
    key_figures = ("accuracy", "base_accuracy", "delta_accuracy", "val_loss", "base_val_loss")
    key_figures += ("delta_accuracy_ci_low", "delta_accuracy_ci_high", "mcnemar_p")
    report.metadata.update({key: figures[key] for key in key_figures if key in figures})
    report.metadata["gate"] = gate["reason"] if gate else "no gate"
    shutil.rmtree(output.parent, ignore_errors=True)
    return passed


# -- register ---------------------------------------------------------------------------------


def register(
    tracking_section: dict[str, Any],
    *,
    config_name: str,
    parent_run_id: str,
    tuned: ArtifactLike,
    record: ArtifactLike,
) -> str:
    """Log the tuned HF model to MLflow and register it with the configured alias; runs only
    when the evaluation gate passed. Returns the model version ("" when not registered)."""
    from megasft import tracking

    settings = tracking_config(tracking_section)
    uri = settings.uri
    name = settings.registered_model or config_name
    alias = settings.alias
    with tracking.step_run(uri, parent_run_id or None, "register") as run:
        version = run.log_hf_model(tuned.path, registered_name=name, alias=alias)
        problems = run.unlogged
    if version:
        text = f"Registered **{name}** version {version} with alias `{alias}` (tracking: {uri})."
    else:
        why = "; ".join(problems) if problems else "tracking is off (no tracking.uri)"
        text = f"The gate passed, but the model was not registered: {why}."
        print(f"megasft register: {text}", file=sys.stderr)
    _write(record, text + "\n", metadata={"registered_model": name, "version": version or ""})
    return version or ""


# -- the exit handler -------------------------------------------------------------------------


def finish(
    tracking_section: dict[str, Any],
    notify: dict[str, Any],
    *,
    config_name: str,
    kfp_run_id: str,
    state: str,
    error_message: str | None = None,
) -> dict[str, Any]:
    """The pipeline's last word, whatever happened: close the MLflow parent run with the
    run's final state and post it to the webhook, if one is configured. Never raises: a run
    that trained must not turn red because a notification failed."""
    from megasft import tracking

    succeeded = state.upper() in ("SUCCEEDED", "SUCCESS")
    report = {
        "pipeline": PIPELINE_NAME,
        "config": config_name,
        "kfp_run_id": kfp_run_id,
        "state": state,
        "error": error_message or None,
    }
    uri = tracking_section.get("uri")
    parent = uri and tracking.find_pipeline_run(
        uri, experiment_name_from(tracking_section, config_name), kfp_run_id
    )
    if parent:
        tracking.end_pipeline_run(uri, parent, "FINISHED" if succeeded else "FAILED")
        report["mlflow_run_id"] = parent
    webhook = notify.get("webhook")
    if webhook:
        report["webhook"] = post_json(webhook, report)
    print(f"megasft pipeline: {json.dumps(report)}", file=sys.stderr)
    return report


def post_json(url: str, payload: dict[str, Any], timeout_s: float = 10.0) -> str:
    """POST `payload` as JSON; returns "sent" or why it was not."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return f"sent ({response.status})"
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"megasft pipeline: webhook {url} not notified: {error}", file=sys.stderr)
        return f"failed: {error}"


# -- helpers ----------------------------------------------------------------------------------


def experiment_name(config: PipelineConfig) -> str:
    return experiment_name_from(config.arguments()["tracking"], config.name)


def experiment_name_from(tracking_section: dict[str, Any], config_name: str) -> str:
    return tracking_section.get("experiment") or f"megasft-{config_name}"


def content_digest(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over a directory's files (relative names and bytes)."""
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


def _combine(*digests: str) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _yaml(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False).rstrip()


def _write(artifact: ArtifactLike, text: str, metadata: dict[str, Any]) -> None:
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(text, encoding="utf-8")
    artifact.metadata.update(metadata)
