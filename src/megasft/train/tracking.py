"""Per-step training metrics to MLflow, when a tracking URI is set.

The tracking server is a convenience, not a dependency of the run: if `mlflow` is not
installed, the server is down, or a request fails, the run goes on. The first failure is
reported once and ends the logging for the run (a dead server would otherwise cost the
client's retries and timeouts on every step); every metric that was not sent is counted, and
the count goes into `summary.json` (`tracking.unsent_metrics`). metrics.jsonl always has
everything.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

# Fail fast instead of the client's default of several retries with backoff per request.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class MetricsTracker:
    """Logs metrics to one MLflow run; every call is safe to make."""

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str):
        self.enabled = tracking_uri is not None
        self.unsent = 0
        self.error: str | None = None
        self._client = None
        self._run_id: str | None = None
        self._created_run_id: str | None = None
        if not self.enabled:
            return
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found else self._client.create_experiment(experiment)
            )
            self._run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            self._created_run_id = self._run_id
        except Exception as error:  # ImportError, connection errors, server errors: all the same
            self._fail(error)

    def log_params(self, params: dict[str, Any]) -> None:
        if self._run_id is None:
            return
        try:
            from mlflow.entities import Param

            self._client.log_batch(
                self._run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()]
            )
        except Exception as error:
            self._fail(error)

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        values = {key: float(value) for key, value in metrics.items() if value is not None}
        if not self.enabled:
            return
        if self._run_id is None:
            self.unsent += len(values)
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(
                self._run_id,
                metrics=[Metric(key, value, now, step) for key, value in values.items()],
            )
        except Exception as error:
            self.unsent += len(values)
            self._fail(error)

    def finish(self, status: str) -> None:
        if self._run_id is None:
            return
        try:
            self._client.set_terminated(
                self._run_id, status="FINISHED" if status == "completed" else "KILLED"
            )
        except Exception as error:
            self._fail(error)

    def summary(self) -> dict[str, Any]:
        return {"run_id": self._created_run_id, "unsent_metrics": self.unsent, "error": self.error}

    def _fail(self, error: Exception) -> None:
        self._run_id = None  # no further attempts: see the module docstring
        if self.error is None:
            self.error = f"{type(error).__name__}: {error}"
            print(
                f"megasft train: warning: MLflow tracking failed ({self.error}); training goes "
                "on and metrics.jsonl has every metric",
                file=sys.stderr,
                flush=True,
            )
