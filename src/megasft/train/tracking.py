"""Per-step training metrics to MLflow, when a tracking URI is set.

Which run: the one the pipeline's train step names in MEGASFT_MLFLOW_RUN_ID (see
`megasft.tracking.training_tracking_env`; empty means log nothing), else KFP's MLFLOW_RUN_ID (the
task's run under Kubeflow's MLflow integration), else a new run of its own in the experiment.
Only a run it created is ended by `finish`; the others belong to whoever made them.

The tracking server is a convenience, not a dependency of the run: if `mlflow` is not
installed, the server is down, or a request fails, the run goes on. The first failure is
reported once. A server that cannot be used ends the logging for the run (a dead server would
otherwise cost the client's retry and timeout on every step); a request the server refuses (a
parameter the step's run already has with another value) costs only what it carried. Every
metric and parameter that was not sent is counted, and the counts go into `summary.json`
(`tracking.unsent_metrics`, `tracking.unsent_params`). metrics.jsonl always has everything.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from megasft.tracking import (
    MAX_BATCH_PARAMS,
    MAX_PARAM_LENGTH,
    apply_http_settings,
    is_rejection,
    training_run,
)


class MetricsTracker:
    """Logs metrics to one MLflow run; every call is safe to make."""

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str):
        uri, run_id = training_run(tracking_uri)
        self.enabled = uri is not None
        self.unsent = 0
        self.unsent_params = 0
        self.error: str | None = None
        self.run_id: str | None = None
        """The run it logs into (created or inherited)."""
        self._client = None
        self._run_id: str | None = None  # None once logging has stopped
        self._created_run_id: str | None = None
        if not self.enabled:
            return
        apply_http_settings()
        try:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                found = self._client.get_experiment_by_name(experiment)
                experiment_id = (
                    found.experiment_id if found else self._client.create_experiment(experiment)
                )
                run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
                self._created_run_id = run_id
            self._run_id = self.run_id = run_id
        except Exception as error:  # ImportError, connection errors, server errors: all the same
            self._fail(error)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._run_id is None:
            self.unsent_params += len(params)
            return
        from mlflow.entities import Param

        entries = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(entries), MAX_BATCH_PARAMS):
            batch = entries[start : start + MAX_BATCH_PARAMS]
            try:
                self._client.log_batch(self._run_id, params=batch)
            except Exception as error:
                self.unsent_params += len(batch)
                self._fail(error)
                if self._run_id is None:
                    self.unsent_params += len(entries) - start - len(batch)
                    return

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
        if self._run_id is None or self._run_id != self._created_run_id:
            return
        try:
            self._client.set_terminated(
                self._run_id, status="FINISHED" if status == "completed" else "KILLED"
            )
        except Exception as error:
            self._fail(error)

    def summary(self) -> dict[str, Any]:
        """`run_id`: the run it logged into; `created_run`: whether it made that run."""
        return {
            "run_id": self.run_id,
            "created_run": self.run_id is not None and self.run_id == self._created_run_id,
            "unsent_metrics": self.unsent,
            "unsent_params": self.unsent_params,
            "error": self.error,
        }

    def _fail(self, error: Exception) -> None:
        if not is_rejection(error):
            self._run_id = None  # no further attempts: see the module docstring
        if self.error is None:
            self.error = f"{type(error).__name__}: {error}"
            print(
                f"megasft train: warning: MLflow tracking failed ({self.error}); training goes "
                "on and metrics.jsonl has every metric",
                file=sys.stderr,
                flush=True,
            )
