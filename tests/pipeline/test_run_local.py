"""The whole pipeline with kfp.local on this machine, tracked by a real `mlflow server`.

One run at test size (200 problems, 4 training steps on 2 CPU processes) takes a couple of
minutes; every check below reads what that one run left behind: the steps' artifacts and
metadata, and the runs, metrics, artifacts and registered model on the MLflow server.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from megasft.pipeline.local import run_local
from tests.mlflow_server import mlflow_server  # noqa: F401  (the fixture)

STEPS = {
    "validate",
    "tokenize-and-mask",
    "checkpoint-convert",
    "record-inputs",
    "train",
    "export",
    "evaluate",
    "register",
}


@pytest.fixture(scope="module")
def local_run(demo_inputs, mlflow_server, tmp_path_factory):  # noqa: F811
    from megasft.pipeline.config import load_pipeline_config

    config = load_pipeline_config("demo")
    config = dataclasses.replace(
        config,
        data={**config.data, "path": str(demo_inputs["train"])},
        model={**config.model, "path": str(demo_inputs["model"])},
        train={
            **config.train,
            "train_iters": 4,
            "warmup_iters": 1,
            "eval_interval": 2,
            "save_interval": 2,
        },
        evaluate={
            **config.evaluate,
            "data": str(demo_inputs["test"]),
            "max_new_tokens": 16,
            # Four steps do not teach arithmetic, but they do lower the validation loss.
            "gate": "delta_val_loss<0",
        },
        tracking={
            "uri": mlflow_server.uri,
            "experiment": "pipeline-e2e",
            "registered_model": "tiny-demo",
            "alias": "champion",
        },
    )
    result = run_local(config, workdir=tmp_path_factory.mktemp("run"))
    return result, mlflow_server.client()


def test_every_step_ran_and_left_its_figures(local_run):
    result, _ = local_run
    assert result.succeeded, result.error
    ran = {name.removesuffix("-2") for name in result.tasks}
    assert ran >= STEPS - {"export"} | {"checkpoint-convert", "finish"}
    assert "checkpoint-convert-2" in result.tasks  # the export: the same component, reversed
    dataset = result.metadata("tokenize-and-mask", "dataset")
    assert dataset["examples"] + dataset["rejected"] == 200
    assert 0.9 < dataset["packing_efficiency"] <= 1.0
    trained = result.metadata("train", "checkpoints")
    assert trained["steps"] == 4 and trained["final_loss"] > 0
    assert result.metadata("checkpoint-convert", "output")["format"] == "megatron"
    assert result.metadata("checkpoint-convert-2", "output")["format"] == "hf"
    report = result.metadata("evaluate", "report")
    assert report["val_loss"] < report["base_val_loss"]
    assert report["gate"].startswith("passed")
    # The paired statistics of the two models' verdicts, in the report and the KFP metrics.
    low, high = report["delta_accuracy_ci_low"], report["delta_accuracy_ci_high"]
    assert -1 <= low <= report["delta_accuracy"] <= high <= 1 and 0 <= report["mcnemar_p"] <= 1
    figures = result.metadata("evaluate", "metrics")
    assert figures["delta_accuracy_ci_low"] == low and figures["mcnemar_p"] == report["mcnemar_p"]
    assert result.tasks["evaluate"]["parameters"]["Output"] is True
    tuned = result.run_directory / "checkpoint-convert-2" / "output"
    assert (tuned / "config.json").is_file() and (tuned / "tokenizer.json").is_file()
    report_html = (result.run_directory / "evaluate" / "report").read_text()
    assert report_html.lower().startswith("<!doctype html>")


def _runs(client, experiment):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=100)


def test_one_parent_run_with_a_nested_run_per_step(local_run):
    result, client = local_run
    runs = _runs(client, "pipeline-e2e")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"  # closed by the exit handler
    assert parent.data.tags["kfp.pipeline_name"] == "megasft-sft"
    assert parent.data.tags["kfp.run_id"]
    assert parent.data.tags["megasft.version"]
    assert parent.data.params["train.train_iters"] == "4"
    children = {
        run.data.tags["mlflow.runName"]: run
        for run in runs
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == STEPS - {"validate", "record-inputs"}
    assert all(run.info.status == "FINISHED" for run in children.values())


def test_training_metrics_datasets_and_artifacts_are_on_the_server(local_run):
    _, client = local_run
    runs = {run.data.tags.get("mlflow.runName"): run for run in _runs(client, "pipeline-e2e")}
    train = runs["train"]
    history = client.get_metric_history(train.info.run_id, "loss")
    assert [point.step for point in history] == [1, 2, 3, 4]  # per step, from rank 0
    assert train.data.metrics["final_loss"] == pytest.approx(history[-1].value)
    prepare = runs["tokenize-and-mask"]
    inputs = client.get_run(prepare.info.run_id).inputs.dataset_inputs
    assert [entry.dataset.name for entry in inputs] == ["sft-data"]
    assert json.loads(inputs[0].dataset.profile)
    artifacts = {entry.path for entry in client.list_artifacts(prepare.info.run_id, "dataset")}
    assert {"dataset/manifest.json", "dataset/preview.html"} <= artifacts
    evaluation = {
        entry.path for entry in client.list_artifacts(runs["evaluate"].info.run_id, "evaluation")
    }
    assert {"evaluation/metrics.json", "evaluation/report.html"} <= evaluation
    assert (
        runs["evaluate"].data.metrics["val_loss"] < runs["evaluate"].data.metrics["base_val_loss"]
    )
    assert "delta_accuracy_ci_low" in runs["evaluate"].data.metrics


def test_the_gated_model_is_registered_with_its_alias(local_run):
    result, client = local_run
    version = client.get_model_version_by_alias("tiny-demo", "champion")
    assert version.version == result.metadata("register", "record")["version"]
    register = [
        run
        for run in _runs(client, "pipeline-e2e")
        if run.data.tags.get("mlflow.runName") == "register"
    ]
    assert version.run_id == register[0].info.run_id
