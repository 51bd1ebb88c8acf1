"""MetricsTracker (training's per-step metrics) against a real `mlflow server`: a run of its
own for a plain `megasft train`, or the run the pipeline's train step hands it."""

from __future__ import annotations

import pytest

from megasft.tracking import RUN_ID_ENV, TRACKING_URI_ENV, MetricsTracker, training_tracking_env
from tests.mlflow_server import mlflow_server  # noqa: F401


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", RUN_ID_ENV, TRACKING_URI_ENV):
        monkeypatch.delenv(name, raising=False)


def test_a_plain_training_run_creates_and_ends_its_own_run(mlflow_server):  # noqa: F811
    tracker = MetricsTracker(mlflow_server.uri, "megasft-train-test", "out-dir")
    tracker.log_params({"lr": 1e-4, "seq_length": 128, "recipe": None})
    for step in (1, 2):
        tracker.log_metrics({"loss": 2.0 / step, "grad_norm": None}, step=step)
    tracker.finish("preempted")

    summary = tracker.summary()
    assert summary["created_run"] and summary["unsent_metrics"] == summary["unsent_params"] == 0
    run = mlflow_server.client().get_run(summary["run_id"])
    assert run.info.run_name == "out-dir" and run.info.status == "KILLED"
    assert run.data.params == {"lr": "0.0001", "seq_length": "128", "recipe": "None"}
    history = mlflow_server.client().get_metric_history(run.info.run_id, "loss")
    assert [(point.step, point.value) for point in history] == [(1, 2.0), (2, 1.0)]


def test_training_logs_into_the_run_it_is_given(mlflow_server, monkeypatch):  # noqa: F811
    client = mlflow_server.client()
    experiment_id = client.create_experiment("megasft-train-given")
    step_run_id = client.create_run(experiment_id, run_name="train").info.run_id
    client.log_param(step_run_id, "lr", "0.5")  # the step logged its own value first
    for name, value in training_tracking_env(mlflow_server.uri, step_run_id).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # ours wins over this one

    tracker = MetricsTracker(None, "megasft-train-unused", "unused")
    tracker.log_params({"lr": 1e-4, "seed": 3})  # lr refused: params are write-once
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.finish("completed")

    assert tracker.summary()["run_id"] == step_run_id
    assert not tracker.summary()["created_run"]
    assert tracker.summary()["unsent_params"] == 2 and "INVALID_PARAMETER_VALUE" in tracker.error
    assert tracker.summary()["unsent_metrics"] == 0  # a refused request does not stop logging
    run = client.get_run(step_run_id)
    assert run.info.status == "RUNNING"  # the step ends its run, not training
    assert run.data.metrics == {"loss": 1.5}
    assert client.get_experiment_by_name("megasft-train-unused") is None


def test_training_logs_nothing_when_the_step_has_no_run(mlflow_server, monkeypatch):  # noqa: F811
    for name, value in training_tracking_env(mlflow_server.uri, None).items():
        monkeypatch.setenv(name, value)
    tracker = MetricsTracker(mlflow_server.uri, "megasft-train-off", "unused")
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert not tracker.enabled and tracker.summary()["unsent_metrics"] == 0
    assert mlflow_server.client().get_experiment_by_name("megasft-train-off") is None
