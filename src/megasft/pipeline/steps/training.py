"""The train step: SFT on megatron-core, where the `launcher` section says.

See docs/pipeline.md and docs/train.md (the launchers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megasft.launch.registry import TrainingPlan, launcher_from_settings
from megasft.pipeline.config import train_settings
from megasft.pipeline.steps.common import ArtifactLike, experiment_name_from

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
    of starting over.

    Args:
        train_section: the `train` section (or a recipe file and its overrides).
        launcher: the `launcher` section.
        tracking_section: the `tracking` section.
        config_name: the configuration's name.
        kfp_run_id: the KFP run's id (names the job and its workspace).
        parent_run_id: the MLflow parent run ("" for none).
        dataset: the prepared Dataset artifact.
        base_checkpoint: the converted base checkpoint's artifact.
        checkpoints: the Model artifact the training output goes into.
        metrics: the KFP Metrics artifact (anything with `log_metric`).

    Returns:
        The training summary (summary.json).

    Raises:
        MegasftError: training ended without completing (retrying the step resumes it).
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
    """The train step's TrainConfig settings (its plan's); `megasft pipeline render-job` uses
    them too.

    Args:
        train_section: the `train` section (a recipe's settings first, then the section's).
        tracking_section: the `tracking` section.
        config_name: the configuration's name (names the default experiment).

    Returns:
        The settings, with the tracking server and experiment.

    Raises:
        ConfigError: a setting or the recipe is invalid.
    """
    values = train_settings(train_section)
    values.update(
        tracking_uri=tracking_section.get("uri"),
        experiment=experiment_name_from(tracking_section, config_name),
    )
    return values


def train_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The key figures of a training summary, as the UI and MLflow show them.

    Args:
        summary: the training summary (summary.json).

    Returns:
        Steps, losses, tokens and throughput, each only where the summary has it.
    """
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
