"""`megasft pipeline render-job`: the training job a configuration's train step would create (a
TrainJob or a PyTorchJob, by `launcher.kind`), built here without a cluster, for review, GitOps
and tests. The train step builds it the same way (`ClusterLauncher.render` is what `run` creates);
only the owner reference, the step's own pod, is the cluster's to add.
"""

from __future__ import annotations

from pathlib import Path

from megasft.errors import ConfigError
from megasft.launch.cluster import ClusterLauncher
from megasft.launch.registry import TrainingPlan
from megasft.pipeline.config import PipelineConfig
from megasft.pipeline.steps.training import training_settings

EXAMPLE_RUN_ID = "00000000-0000-0000-0000-000000000000"
"""The run id a rendered job is named after when none is given (the name hashes the run's id)."""


def render_job(config: PipelineConfig, run_id: str = EXAMPLE_RUN_ID) -> dict:
    """The job that `config`'s train step creates in pipeline run `run_id`.

    Args:
        config: the pipeline configuration; its launcher must run training as a cluster job.
        run_id: the KFP run's id, which the job's name and workspace come from.

    Returns:
        The job, as the Kubernetes API would receive it.

    Raises:
        ConfigError: for a launcher that creates no job (`local`), settings that do not fit, or
            a PyTorchJob whose template is the cluster's (give it with launcher.template).
    """
    launcher = config.launcher
    if not isinstance(launcher, ClusterLauncher):
        raise ConfigError(
            f"config {config.name}: launcher.kind {launcher.kind} trains in the step itself and "
            "creates no job; add --set launcher.kind=trainjob (or pytorchjob)"
        )
    # The sections as the pipeline hands them to its train step.
    sections = config.arguments()
    plan = TrainingPlan(
        settings=training_settings(
            sections["train"], sections["tracking"], sections["config_name"]
        ),
        # The step stages its inputs into the workspace; where they came from is not in the job.
        dataset=Path("dataset"),
        base_checkpoint=Path("base-checkpoint"),
        output=Path("checkpoints"),
        run_id=run_id,
    )
    return launcher.render(plan)
