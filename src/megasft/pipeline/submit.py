"""`megasft pipeline submit`: upload the SFT pipeline to Kubeflow Pipelines and start a run.

    megasft pipeline submit --host URL [--config NAME|PATH] [--experiment NAME] [--wait]
                            [--timeout SECONDS] [--run-name NAME] [--namespace NAMESPACE]

Compile, find or upload the pipeline version, find or create the experiment, start the run and,
with --wait, follow it. The steps, exit codes, authentication and links are in
docs/pipeline.md, "Submitting to Kubeflow".
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megasft import __version__
from megasft.errors import ConfigError, MegasftError
from megasft.pipeline.config import PipelineConfig
from megasft.pipeline.kfp_client import (
    api_errors,
    check_endpoint,
    connect,
    normalized_host,
    quietly,
)
from megasft.pipeline.run_summary import write_step_summary
from megasft.pipeline.steps.common import PIPELINE_NAME

UI_ENDPOINT_VARIABLE = "KF_PIPELINES_UI_ENDPOINT"  # kfp.client's own name for it

EXIT_SUCCEEDED = 0
EXIT_RUN_FAILED = 1
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130

SUCCEEDED = "SUCCEEDED"
# KFP v2beta1 RuntimeState values in which a run stays; CANCELING is on its way to CANCELED.
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"})
POLL_INTERVAL_S = 15.0
# Consecutive failed status requests tolerated while waiting (an API server restart, a blip).
STATUS_ERRORS_TOLERATED = 5


@dataclass(frozen=True)
class Submission:
    """What `submit_pipeline` created or found, for the summary and the tests."""

    run_id: str
    run_link: str
    run_name: str
    experiment: str
    pipeline_version: str
    version_uploaded: bool


def submit_pipeline(
    config: PipelineConfig,
    *,
    host: str,
    experiment: str | None,
    wait: bool,
    timeout_s: float | None,
    run_name: str | None,
    namespace: str | None,
    poll_interval_s: float | None = None,
) -> int:
    """Upload the pipeline if it changed, start a run of `config`, and optionally wait for it.

    Args:
        config: the run configuration; its `arguments()` are the run's parameters.
        host: the KFP API's URL.
        experiment: the KFP experiment (default: the configuration's name).
        wait: follow the run until it ends.
        timeout_s: stop waiting after this many seconds (None: no limit).
        run_name: the run's name (default: the configuration's name and the time).
        namespace: the Kubeflow profile namespace (None for single-user KFP).
        poll_interval_s: seconds between status requests while waiting (default
            POLL_INTERVAL_S).

    Returns:
        The exit code: EXIT_SUCCEEDED, EXIT_RUN_FAILED, EXIT_TIMEOUT or EXIT_INTERRUPTED.

    Raises:
        ConfigError: a bad --host or --timeout.
        MegasftError: a problem before the run exists (unreachable, not authorized, upload
            refused), or contact lost while waiting.
    """
    host = normalized_host(host)
    namespace = namespace or None  # `--namespace ""` (an unset CI variable): single-user KFP
    if timeout_s is not None and timeout_s <= 0:
        raise ConfigError(f"--timeout {timeout_s:g}: give a positive number of seconds")
    experiment = experiment or config.name
    run_name = run_name or f"{config.name}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"

    with tempfile.TemporaryDirectory(prefix="megasft-submit-") as workdir:
        from megasft.pipeline.compile import compile_pipeline

        package = compile_pipeline(Path(workdir) / "sft-pipeline.yaml")
        version_name = pipeline_version_name(package)
        _progress(f"compiled the pipeline: version {version_name}")
        check_endpoint(host)
        client = connect(host, namespace)
        with api_errors(host, "uploading the pipeline"):
            version_id, pipeline_id, uploaded = ensure_pipeline_version(
                client, package, version_name, namespace
            )
    with api_errors(host, f"finding or creating the experiment {experiment!r}"):
        found = quietly(client.create_experiment, experiment, namespace=namespace)
        _progress(f"experiment {experiment} ({found.experiment_id})")
    with api_errors(host, "creating the run"):
        run = quietly(
            client.run_pipeline,
            experiment_id=found.experiment_id,
            job_name=run_name,
            params=config.arguments(),
            pipeline_id=pipeline_id,
            version_id=version_id,
        )
    submission = Submission(
        run_id=run.run_id,
        run_link=run_link(host, run.run_id),
        run_name=run_name,
        experiment=experiment,
        pipeline_version=version_name,
        version_uploaded=uploaded,
    )
    print(f"run id: {submission.run_id}")
    print(f"run link: {submission.run_link}")
    sys.stdout.flush()
    if not wait:
        write_step_summary(config, submission, state=None)
        return EXIT_SUCCEEDED
    if poll_interval_s is None:
        poll_interval_s = POLL_INTERVAL_S
    code, state = wait_for_run(client, submission, timeout_s, poll_interval_s)
    write_step_summary(config, submission, state=state)
    return code


# -- the pipeline and its version -------------------------------------------------------------


def pipeline_version_name(package: Path) -> str:
    """The name of the pipeline version a compiled package is uploaded as.

    Args:
        package: the compiled pipeline YAML.

    Returns:
        `<package version>-<first 10 hex of the YAML's sha256>`: equal YAML, equal name.
    """
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:10]
    return f"{__version__}-{digest}"


def ensure_pipeline_version(
    client: Any, package: Path, version_name: str, namespace: str | None
) -> tuple[str, str, bool]:
    """The version named `version_name` of the pipeline, uploaded if missing.

    Args:
        client: a kfp.Client.
        package: the compiled pipeline YAML.
        version_name: the version's name (`pipeline_version_name`).
        namespace: the Kubeflow profile namespace (None for single-user KFP).

    Returns:
        (version id, pipeline id, whether anything was uploaded).

    Raises:
        MegasftError: KFP holds more than one pipeline or version of that name.
    """
    pipeline_id = _find_by_display_name(
        client.list_pipelines(filter=_name_filter(PIPELINE_NAME), namespace=namespace).pipelines,
        PIPELINE_NAME,
    )
    if pipeline_id is None:
        # KFP names the first version of an uploaded pipeline after the pipeline itself and
        # offers no way to name it, so the named version is uploaded next to it: every run
        # then points at a version whose name says which code it ran.
        pipeline = quietly(
            client.upload_pipeline,
            str(package),
            pipeline_name=PIPELINE_NAME,
            description="megasft: supervised fine-tuning with megatron-core",
            namespace=namespace,
        )
        pipeline_id = pipeline.pipeline_id
        _progress(f"uploaded the pipeline {PIPELINE_NAME} ({pipeline_id})")
    else:
        versions = client.list_pipeline_versions(
            pipeline_id, filter=_name_filter(version_name), page_size=100
        ).pipeline_versions
        version_id = _find_by_display_name(versions, version_name, key="pipeline_version_id")
        if version_id is not None:
            _progress(f"pipeline {PIPELINE_NAME} version {version_name} unchanged; reusing it")
            return version_id, pipeline_id, False
    version = quietly(
        client.upload_pipeline_version,
        str(package),
        pipeline_version_name=version_name,
        pipeline_id=pipeline_id,
    )
    _progress(f"uploaded pipeline {PIPELINE_NAME} version {version_name}")
    return version.pipeline_version_id, pipeline_id, True


def _name_filter(name: str) -> str:
    """A v2beta1 Filter (as JSON) for objects whose display name is `name`."""
    # The operation as kfp.Client itself sends it: the enum's number (EQUALS = 1).
    predicate = {"operation": 1, "key": "display_name", "stringValue": name}
    return json.dumps({"predicates": [predicate]})


def _find_by_display_name(items: list | None, name: str, key: str = "pipeline_id") -> str | None:
    # The server filters already; matching again guards against one that ignores the filter.
    matches = [getattr(item, key) for item in items or [] if item.display_name == name]
    if len(matches) > 1:
        raise MegasftError(f"KFP holds {len(matches)} objects named {name!r}; expected one")
    return matches[0] if matches else None


def _progress(message: str) -> None:
    print(f"megasft pipeline submit: {message}", file=sys.stderr)


def run_link(host: str, run_id: str) -> str:
    """The run's page in the Kubeflow UI (`$KF_PIPELINES_UI_ENDPOINT`, else `host`).

    Args:
        host: the KFP API's URL.
        run_id: the run's id.

    Returns:
        `{base}/#/runs/details/{run_id}`.
    """
    base = os.environ.get(UI_ENDPOINT_VARIABLE, "").strip().rstrip("/") or host
    return f"{base}/#/runs/details/{run_id}"


# -- waiting ----------------------------------------------------------------------------------


def wait_for_run(
    client: Any,
    submission: Submission,
    timeout_s: float | None,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> tuple[int, str | None]:
    """Poll the run until it ends, the timeout passes or Ctrl-C.

    Args:
        client: a kfp.Client.
        submission: the run.
        timeout_s: stop waiting after this many seconds (None: no limit).
        poll_interval_s: seconds between status requests.

    Returns:
        (exit code, last state seen).

    Raises:
        MegasftError: more than STATUS_ERRORS_TOLERATED status requests failed in a row.
    """
    run_id, link = submission.run_id, submission.run_link
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    state: str | None = None
    errors = 0
    try:
        while True:
            try:
                run = client.get_run(run_id)
                errors = 0
            except Exception as error:  # noqa: BLE001 - kfp raises ApiException and urllib3's
                errors += 1
                if errors > STATUS_ERRORS_TOLERATED:
                    raise MegasftError(
                        f"lost contact with KFP while waiting for run {run_id} ({error}); "
                        f"the run is not affected: {link}"
                    ) from error
                _progress(f"reading the run's state failed ({error}); trying again")
            else:
                new_state = str(run.state or "PENDING")
                if new_state != state:
                    _progress(f"run {run_id}: {new_state}")
                state = new_state
                if state in TERMINAL_STATES:
                    return _report_end(run, link), state
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _progress(
                        f"run {run_id} still {state or 'unknown'} after {timeout_s:g} s "
                        f"(--timeout); stopped waiting, the run keeps going: {link}"
                    )
                    return EXIT_TIMEOUT, state
                time.sleep(min(poll_interval_s, remaining))
            else:
                time.sleep(poll_interval_s)
    except KeyboardInterrupt:
        _progress(
            f"stopped waiting (Ctrl-C); run {run_id} keeps running in Kubeflow: {link} "
            "(terminate it there if you meant to stop it)"
        )
        return EXIT_INTERRUPTED, state


def _report_end(run: Any, link: str) -> int:
    if run.state == SUCCEEDED:
        _progress(f"run {run.run_id} succeeded: {link}")
        return EXIT_SUCCEEDED
    lines = [f"run {run.run_id} ended {run.state}: {link}"]
    if run.error is not None and run.error.message:
        lines.append(f"  error: {run.error.message}")
    tasks = run.run_details.task_details if run.run_details is not None else None
    for task in tasks or []:
        if task.state in ("FAILED", "CANCELED") and task.display_name:
            message = task.error.message if task.error is not None else None
            lines.append(
                f"  step {task.display_name}: {task.state}" + (f": {message}" if message else "")
            )
    _progress("\n".join(lines))
    return EXIT_RUN_FAILED
