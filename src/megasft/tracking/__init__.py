"""MLflow for megasft: one parent run per pipeline run, a nested run per step, and training's
per-step metrics in the train step's run. Every call is safe to make: the tracking server is a
convenience, not a dependency (see `client.Connection`). How runs nest, KFP's own MLflow
integration and what a failure costs: docs/pipeline.md ("MLflow").

    with step_run(uri, parent_run_id, "train") as step, training_tracking(uri, step.run_id):
        run_training(config)  # rank 0's MetricsTracker logs into the step's run

Nothing here imports mlflow until it is used (the import alone takes seconds).
"""

from megasft.tracking.client import (
    DIGEST_TAG,
    GIT_COMMIT_TAG,
    HTTP_SETTINGS,
    KFP_RUN_ID_TAG,
    MANAGED_TAG,
    MAX_BATCH_METRICS,
    MAX_BATCH_PARAMS,
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    PARENT_RUN_TAG,
    RUN_STATUSES,
    STEP_TAG,
    VERSION_TAG,
    Connection,
    apply_http_settings,
    flatten,
    is_rejection,
    resolve_tracking_uri,
)
from megasft.tracking.datasets import mlflow_digest
from megasft.tracking.pipeline_run import (
    GIT_COMMIT_ENV,
    end_pipeline_run,
    ensure_experiment,
    find_pipeline_run,
    git_commit,
    standard_tags,
    start_pipeline_run,
)
from megasft.tracking.step_run import ALIAS_PATTERN, StepRun, step_run
from megasft.tracking.training import (
    RUN_ID_ENV,
    TRACKING_URI_ENV,
    MetricsTracker,
    training_run,
    training_tracking,
    training_tracking_env,
)

__all__ = [
    "ALIAS_PATTERN",
    "DIGEST_TAG",
    "GIT_COMMIT_ENV",
    "GIT_COMMIT_TAG",
    "HTTP_SETTINGS",
    "KFP_RUN_ID_TAG",
    "MANAGED_TAG",
    "MAX_BATCH_METRICS",
    "MAX_BATCH_PARAMS",
    "MAX_PARAM_LENGTH",
    "MAX_TAG_LENGTH",
    "PARENT_RUN_TAG",
    "RUN_ID_ENV",
    "RUN_STATUSES",
    "STEP_TAG",
    "TRACKING_URI_ENV",
    "VERSION_TAG",
    "Connection",
    "MetricsTracker",
    "StepRun",
    "apply_http_settings",
    "end_pipeline_run",
    "ensure_experiment",
    "find_pipeline_run",
    "flatten",
    "git_commit",
    "is_rejection",
    "mlflow_digest",
    "resolve_tracking_uri",
    "standard_tags",
    "start_pipeline_run",
    "step_run",
    "training_run",
    "training_tracking",
    "training_tracking_env",
]
