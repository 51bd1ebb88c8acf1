"""Training's per-step metrics in MLflow: which run rank 0 logs into, and `MetricsTracker`.

Which run: the one the pipeline's train step names in MEGASFT_MLFLOW_RUN_ID (set through
`training_tracking`; empty means log nothing), else KFP's MLFLOW_RUN_ID (the task's run under
Kubeflow's MLflow integration), else a new run of its own in the experiment. Only a run it
created is ended by `finish`. The server never stops training: what was not sent is counted
for summary.json (`tracking.unsent_metrics`, `tracking.unsent_params`); see docs/train.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from megasft.tracking.client import (
    Connection,
    experiment_id,
    log_metrics,
    log_params,
    names,
    resolve_tracking_uri,
)

RUN_ID_ENV = "MEGASFT_MLFLOW_RUN_ID"
"""The run training logs into (set by `training_tracking_env`); empty: training logs nothing."""
TRACKING_URI_ENV = "MEGASFT_MLFLOW_TRACKING_URI"
"""The tracking URI of RUN_ID_ENV's run."""


def training_tracking_env(tracking_uri: str | None, run_id: str | None) -> dict[str, str]:
    """Environment for the training processes (torchrun ranks inherit it) so that rank 0's
    `MetricsTracker` logs its per-step metrics into `run_id` (the train step's run) instead of
    a run of its own; without a run, training logs nothing."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None or not run_id:
        return {RUN_ID_ENV: ""}
    return {TRACKING_URI_ENV: uri, RUN_ID_ENV: run_id}


@contextmanager
def training_tracking(tracking_uri: str | None, run_id: str | None) -> Iterator[None]:
    """`training_tracking_env` set in os.environ for the duration, for training started in this
    process (torchrun and its ranks inherit this process's environment)."""
    values = training_tracking_env(tracking_uri, run_id)
    saved = {name: os.environ.get(name) for name in (RUN_ID_ENV, TRACKING_URI_ENV)}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def training_run(tracking_uri: str | None) -> tuple[str | None, str | None]:
    """(tracking URI, run id) for training's metrics: the run `training_tracking_env` names,
    else KFP's MLFLOW_RUN_ID, else (URI, None): a run of its own. (None, None): log nothing."""
    if RUN_ID_ENV in os.environ:
        run_id = os.environ[RUN_ID_ENV]
        uri = os.environ.get(TRACKING_URI_ENV) or resolve_tracking_uri(tracking_uri)
        return (uri, run_id) if uri and run_id else (None, None)
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None, None
    return uri, os.environ.get("MLFLOW_RUN_ID") or None


class MetricsTracker:
    """Rank 0's MLflow run for training's metrics; every call is safe to make.

    A server that cannot be used ends the logging for the run (a dead server would otherwise
    cost the client's retry and timeout on every step); a request the server refuses (a
    parameter the step's run already has with another value) costs only what it carried. The
    first failure is reported once on stderr.

    Args:
        tracking_uri: --tracking-uri (see `training_run` for which run it logs into).
        experiment: where a run of its own is created.
        run_name: the name of a run of its own.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str):
        uri, run_id = training_run(tracking_uri)
        self.enabled = uri is not None
        self.unsent = 0
        self.unsent_params = 0
        self.error: str | None = None
        """Why the first request that failed failed."""
        self.run_id: str | None = None
        """The run it logs into (created or inherited)."""
        self._created = False
        # Its own connection, not the process's shared one: the warning is training's own.
        self._connection = Connection(uri, quiet=True) if self.enabled else None
        if not self.enabled or run_id is not None:
            self.run_id = run_id
            return

        def create(client) -> str:
            experiment_key = experiment_id(client, experiment)
            return client.create_run(experiment_key, run_name=run_name).info.run_id

        self.run_id = self._connection.call("the run", create, [])
        self._created = self.run_id is not None
        self._report_first_failure()

    def log_params(self, params: dict[str, Any]) -> None:
        """Parameters (the settings), values cut to 500 characters."""
        if not self.enabled:
            return
        if self.run_id is None:
            self.unsent_params += len(params)
            return
        what = f"params {names(params)}"
        self.unsent_params += log_params(self._connection, self.run_id, params, what, [])
        self._report_first_failure()

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Metrics (None values are left out) at `step`."""
        values = {key: float(value) for key, value in metrics.items() if value is not None}
        if not self.enabled:
            return
        if self.run_id is None:
            self.unsent += len(values)
            return
        what = f"metrics {names(values)} at step {step}"
        if not log_metrics(self._connection, self.run_id, values, step, what, []):
            self.unsent += len(values)
        self._report_first_failure()

    def finish(self, status: str) -> None:
        """End the run with `status` ("completed": FINISHED, else KILLED), if it created it."""
        if not self._created or self._connection.unreachable is not None:
            return
        mlflow_status = "FINISHED" if status == "completed" else "KILLED"
        self._connection.call(
            f"the end of the run ({mlflow_status})",
            lambda client: client.set_terminated(self.run_id, status=mlflow_status),
            [],
        )
        self._report_first_failure()

    def summary(self) -> dict[str, Any]:
        """`run_id`: the run it logged into; `created_run`: whether it made that run."""
        return {
            "run_id": self.run_id,
            "created_run": self._created,
            "unsent_metrics": self.unsent,
            "unsent_params": self.unsent_params,
            "error": self.error,
        }

    def _report_first_failure(self) -> None:
        if self.error is None and self._connection.first_error is not None:
            self.error = self._connection.first_error
            print(
                f"megasft train: warning: MLflow tracking failed ({self.error}); training goes "
                "on and metrics.jsonl has every metric",
                file=sys.stderr,
                flush=True,
            )
