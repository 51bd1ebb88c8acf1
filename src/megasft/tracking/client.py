"""The one MLflow client of megasft: a `Connection` per tracking URI that carries on after
failures, and the helpers every kind of run shares (settings, tags, parameters).

What a failure costs is said in `Connection.call`; docs/pipeline.md ("MLflow") has the why.
Nothing here imports mlflow until it is used (the import alone takes seconds).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Fail fast instead of the client's default of 7 retries with backoff and a 120 s timeout per
# request. Set only where the environment does not set them already (a server that is slow to
# acknowledge multi-GB model uploads may need a longer MLFLOW_HTTP_REQUEST_TIMEOUT).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_RUN_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
VERSION_TAG = "megasft.version"
KFP_RUN_ID_TAG = "kfp.run_id"
"""The tag `find_pipeline_run` looks the pipeline run up by; the caller sets it."""
STEP_TAG = "megasft.step"
MANAGED_TAG = "megasft.managed"
""""true" on runs megasft created, and so ends; absent on runs KFP (or a user) made."""
DIGEST_TAG = "megasft.digest"
"""Dataset input tag with the caller's whole digest (MLflow keeps at most 36 characters)."""

MAX_PARAM_LENGTH = 500  # what every MLflow server accepts (newer ones take 6000)
MAX_TAG_LENGTH = 5000
MAX_BATCH_PARAMS = 100  # MLflow's limits per log_batch request
MAX_BATCH_METRICS = 1000


def resolve_tracking_uri(tracking_uri: str | None) -> str | None:
    """MLFLOW_TRACKING_URI when set (KFP's integration sets it), else `tracking_uri`; None (or
    "") means tracking is off."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or None


def apply_http_settings() -> None:
    """HTTP_SETTINGS into os.environ, where the environment does not set them already."""
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


def is_rejection(error: BaseException) -> bool:
    """Whether the server answered and refused just this request (4xx: a bad value, a parameter
    logged twice with different values, an unknown run), as opposed to a server that cannot be
    used at all (unreachable, timed out, 5xx after the retry, authentication refused)."""
    status_code = getattr(error, "get_http_status_code", None)  # MlflowException's
    if status_code is None:
        return False
    status = status_code()
    return 400 <= status < 500 and status not in (401, 403)


class Connection:
    """The client for one tracking URI and whether it is still worth calling.

    Args:
        uri: the tracking URI (also the model registry's).
        quiet: leave the warnings to the caller (training prints one of its own).
    """

    def __init__(self, uri: str, *, quiet: bool = False):
        self.uri = uri
        self.unreachable: str | None = None  # why, once a call found the server unusable
        self.first_error: str | None = None  # why the first failed call failed
        self._quiet = quiet
        self._client = None

    def call(self, what: str, action: Callable[[Any], T], unlogged: list[str]) -> T | None:
        """`action(client)`, or None when the server cannot be used or refuses it.

        A server that cannot be used (connection refused, timeouts, 5xx after the client's
        retry, authentication refused) is warned about once and not called again: one failed
        call costs at most the HTTP timeout times (1 + retries) of HTTP_SETTINGS, later calls
        nothing. A request the server refuses (a 4xx) is warned about and skipped on its own.

        Args:
            what: what the call logs, for the warning and `unlogged` ("params lr,seed").
            action: the calls to make with the MlflowClient.
            unlogged: where `what` goes, with why, when it was not logged.

        Returns:
            What `action` returned, or None when it failed.

        Raises:
            Exception: errors other than MLflow's, the network's and a missing mlflow: bugs.
        """
        if self.unreachable is not None:
            unlogged.append(f"{what}: MLflow at {self.uri} unreachable ({self.unreachable})")
            return None
        try:
            if self._client is None:
                apply_http_settings()
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return action(self._client)
        except Exception as error:
            if not _is_tracking_error(error):
                raise
            reason = _describe(error)
            self.first_error = self.first_error or reason
            if is_rejection(error):
                unlogged.append(f"{what}: refused by MLflow at {self.uri} ({reason})")
                self._warn(f"MLflow at {self.uri} refused {what}: {reason}")
            elif isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
                unlogged.append(f"{what}: {reason}")  # a local file, not the server
                self._warn(f"could not log {what}: {reason}")
            else:
                self.unreachable = reason
                unlogged.append(f"{what}: MLflow at {self.uri} unreachable ({reason})")
                self._warn(
                    f"MLflow at {self.uri} unreachable: {reason}; continuing without tracking"
                )
            return None

    def _warn(self, message: str) -> None:
        if not self._quiet:
            print(f"megasft: warning: {message}", file=sys.stderr, flush=True)


_connections: dict[str, Connection] = {}


def connection(uri: str) -> Connection:
    """The process's shared Connection to `uri`: once a server is found unusable, every later
    call of this process skips it."""
    if uri not in _connections:
        _connections[uri] = Connection(uri)
    return _connections[uri]


def _is_tracking_error(error: Exception) -> bool:
    """MLflow's errors (its HTTP errors are MlflowExceptions), the network's, a missing mlflow."""
    if isinstance(error, OSError | ImportError):
        return True
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(error, MlflowException | requests.RequestException)


def _describe(error: Exception) -> str:
    """One line: for a failed request, the URL and the cause at the bottom of urllib3's
    "Max retries exceeded ... Caused by ..." chain; else the error's first 300 characters."""
    text = " ".join(str(error).split())
    cause = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out[^'\"]*", text)
    if text.startswith("API request to") and cause:
        return f"{text.split(' failed', 1)[0]} failed: {cause.group(0).strip()}"
    return f"{type(error).__name__}: {text[:300]}"


# --- what every kind of run logs ----------------------------------------------------------------


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: {"train": {"lr": 0.002}} -> {"train.lr": "0.002"},
    each value cut to MAX_PARAM_LENGTH characters."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def log_params(
    connection: Connection, run_id: str, params: dict[str, Any], what: str, unlogged: list[str]
) -> int:
    """`params` (flattened) into run `run_id`, in batches of MAX_BATCH_PARAMS, each its own
    request. Returns how many were not logged; each failed batch is in `unlogged`."""
    entries = list(flatten(params).items())
    unsent = 0
    for start in range(0, len(entries), MAX_BATCH_PARAMS):
        batch = entries[start : start + MAX_BATCH_PARAMS]

        def log(client, batch=batch) -> bool:
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(key, value) for key, value in batch])
            return True

        if connection.call(what, log, unlogged) is None:
            unsent += len(batch)
    return unsent


def log_metrics(
    connection: Connection,
    run_id: str,
    values: dict[str, float],
    step: int,
    what: str,
    unlogged: list[str],
) -> bool:
    """`values` at `step` into run `run_id` (in batches of MAX_BATCH_METRICS, one call).
    Returns whether they were logged; when not, `what` is in `unlogged`."""

    def log(client) -> bool:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(entries), MAX_BATCH_METRICS):
            client.log_batch(run_id, metrics=entries[start : start + MAX_BATCH_METRICS])
        return True

    return connection.call(what, log, unlogged) is not None


def names(values: dict[str, Any]) -> str:
    """The first five keys, for what a call logs: "lr,seed,... (12)"."""
    ordered = sorted(values)
    return ",".join(ordered[:5]) + (f",... ({len(ordered)})" if len(ordered) > 5 else "")


def tag_values(tags: dict[str, Any]) -> dict[str, str]:
    """Tag values as strings MLflow accepts (at most MAX_TAG_LENGTH characters)."""
    return {key: str(value)[:MAX_TAG_LENGTH] for key, value in tags.items()}


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """Tags on an existing run, in one request."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tag_values(tags).items()])


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created (with `artifact_location`) when it does not exist."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:  # another step created it in between
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def check_status(status: str) -> None:
    """Raises ValueError for a run status MLflow does not have."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
