"""The pipeline's parent MLflow run: opened by the first step, found again and ended by the
exit handler; under KFP's own MLflow integration, KFP's run is used instead of a second one.
See docs/pipeline.md ("MLflow").
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from megasft import __version__
from megasft.tracking.client import (
    GIT_COMMIT_TAG,
    KFP_RUN_ID_TAG,
    MANAGED_TAG,
    PARENT_RUN_TAG,
    VERSION_TAG,
    check_status,
    connection,
    experiment_id,
    log_params,
    resolve_tracking_uri,
    set_tags,
    tag_values,
)

GIT_COMMIT_ENV = "MEGASFT_GIT_COMMIT"
"""The git commit to tag runs with, for images built without the .git directory."""


def start_pipeline_run(
    tracking_uri: str | None,
    experiment: str,
    *,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
) -> str | None:
    """Open the pipeline's parent run.

    Args:
        tracking_uri: the configured URI (MLFLOW_TRACKING_URI wins); None or "": tracking off.
        experiment: where to create the run.
        run_name: its name.
        tags: the caller's tags (the KFP run id, ...), beside `standard_tags`.
        params: the settings; nested dicts become dotted names.

    Returns:
        The run's id: created in `experiment`, or, under KFP's MLflow integration
        (MLFLOW_RUN_ID set), KFP's own run, which gets the tags and params instead. None when
        tracking is off or the server cannot be used.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None
    server = connection(uri)
    run_tags = {**standard_tags(), **tags}

    def start(client) -> str:
        inherited = os.environ.get("MLFLOW_RUN_ID")
        if inherited:
            # KFP's MLFLOW_RUN_ID is this task's nested run; the pipeline's run is its parent.
            # Without a parent (a run a user exported), it is the pipeline's run itself.
            run_id = client.get_run(inherited).data.tags.get(PARENT_RUN_TAG, inherited)
            set_tags(client, run_id, run_tags)
            return run_id
        experiment_key = experiment_id(client, experiment)
        run_tags[MANAGED_TAG] = "true"
        run = client.create_run(experiment_key, run_name=run_name, tags=tag_values(run_tags))
        return run.info.run_id

    run_id = server.call("the pipeline run", start, unlogged=[])
    if run_id is not None:
        log_params(server, run_id, params, "the pipeline run's params", unlogged=[])
    return run_id


def find_pipeline_run(tracking_uri: str | None, experiment: str, kfp_run_id: str) -> str | None:
    """The pipeline run `start_pipeline_run` made, for a later process such as the exit handler.

    Args:
        tracking_uri: as for `start_pipeline_run`.
        experiment: where the run was made.
        kfp_run_id: the KFP run id the run is tagged with (`kfp.run_id`).

    Returns:
        Its id (under KFP's MLflow integration, KFP's parent run); None when there is none, or
        tracking is off or unusable.

    Raises:
        ValueError: a KFP run id with a quote (it goes into a search filter).
    """
    if "'" in kfp_run_id:
        raise ValueError(f"find_pipeline_run: a KFP run id has no quotes: {kfp_run_id!r}")
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None

    def find(client) -> str | None:
        inherited = os.environ.get("MLFLOW_RUN_ID")
        if inherited:
            return client.get_run(inherited).data.tags.get(PARENT_RUN_TAG, inherited)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run_id}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    return connection(uri).call(f"the pipeline run of KFP run {kfp_run_id}", find, unlogged=[])


def ensure_experiment(
    tracking_uri: str | None, experiment: str, *, artifact_location: str | None = None
) -> str | None:
    """The experiment's id, creating it (with `artifact_location`, e.g. a file:// URI beside an
    embedded sqlite store) when it does not exist yet. None when tracking is off or unusable."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None
    return connection(uri).call(
        f"the experiment {experiment}",
        lambda client: experiment_id(client, experiment, artifact_location),
        unlogged=[],
    )


def end_pipeline_run(tracking_uri: str | None, run_id: str | None, status: str) -> None:
    """End the pipeline's run with `status`, if megasft created it (KFP ends its own).

    Args:
        tracking_uri: as for `start_pipeline_run`.
        run_id: the run; None or "": nothing to do.
        status: FINISHED, FAILED or KILLED.

    Raises:
        ValueError: another status.
    """
    check_status(status)
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None or not run_id:
        return

    def end(client) -> None:
        if client.get_run(run_id).data.tags.get(MANAGED_TAG) == "true":
            client.set_terminated(run_id, status=status)

    connection(uri).call(f"the end of the pipeline run ({status})", end, unlogged=[])


def standard_tags() -> dict[str, str]:
    """Tags every pipeline run gets: the megasft version and, when known, the git commit."""
    tags = {VERSION_TAG: __version__}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags


def git_commit() -> str | None:
    """MEGASFT_GIT_COMMIT, else HEAD of the checkout this package runs from (an editable
    install), else None (an installed wheel: its directory is no checkout of megasft)."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    package = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-prefix", "HEAD"],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.split()
    # --show-prefix is the package's path in the work tree: "src/megasft/" in megasft's own
    # checkout, ".../site-packages/megasft/" for a venv that happens to sit inside some repository.
    if result.returncode != 0 or len(lines) != 2 or "site-packages" in lines[0]:
        return None
    return lines[1]
