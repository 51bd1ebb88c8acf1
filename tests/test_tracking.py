"""megasft.tracking against a real `mlflow server` (tests/mlflow_server.py), and without one.

What is checked on the server itself, through a separate client: the parent run and its nested
step runs with tags, params and metrics (training's per-step metrics logged by MetricsTracker
into the train step's run), artifacts, dataset inputs with their digest and source, the logged
model and its registered version and alias; KFP's MLFLOW_RUN_ID reused instead of a second run;
and a server that is down, silent, or dies mid-run costs a warning and a list, not the run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megasft import __version__
from megasft.tracking import (
    GIT_COMMIT_ENV,
    RUN_ID_ENV,
    TRACKING_URI_ENV,
    MetricsTracker,
    end_pipeline_run,
    find_pipeline_run,
    mlflow_digest,
    start_pipeline_run,
    step_run,
    training_tracking,
    training_tracking_env,
)
from tests.mlflow_server import TcpRelay, free_port, mlflow_server  # noqa: F401

SHA = "sha256:" + "ab" * 32  # the form `prepare` writes


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in (RUN_ID_ENV, TRACKING_URI_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(GIT_COMMIT_ENV, "0123abcd")


def prepared_dataset(directory: Path) -> Path:
    """A `megasft prepare` output as far as log_dataset reads it: manifest.json."""
    directory.mkdir(parents=True)
    split = {"rows": 4, "examples": 5, "tokens": 300, "loss_tokens": 120}
    manifest = {
        "format_version": 1,
        "sources": [{"path": "/data/raw.jsonl", "sha256": SHA, "format": "alpaca"}],
        "examples": 6,
        "rows_read": 7,
        "rejected": {"total": 1, "by_reason": {"empty": 1}},
        "splits": {"train": split, "val": {"rows": 1, "examples": 1, "tokens": 60}},
        "tokens": 360,
        "loss_tokens": 140,
        "packing_efficiency": 0.9,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "preview.html").write_text("<html></html>")
    return directory


def hf_model(directory: Path) -> Path:
    """A Hugging Face model directory: config, safetensors weights, tokenizer files."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({"lm_head.weight": np.arange(32, dtype=np.float32).reshape(4, 8)},
              str(directory / "model.safetensors"))  # fmt: skip
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def child_runs(client, parent_run_id: str) -> dict[str, object]:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {run.info.run_name: run for run in runs}


# --- without a server ---------------------------------------------------------------------------


def test_importing_does_not_import_mlflow():
    code = "import sys, megasft.tracking; print('mlflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_tracking_off_does_nothing_but_still_checks_arguments(tmp_path, capsys):
    assert start_pipeline_run(None, "e", run_name="r", tags={}, params={"a": 1}) is None
    assert start_pipeline_run("", "e", run_name="r", tags={}, params={}) is None
    assert find_pipeline_run(None, "e", "kfp-1") is None
    end_pipeline_run(None, None, "FINISHED")
    with step_run(None, None, "prepare", params={"a": 1}) as step:
        step.log_params({"a": 1})
        step.log_metrics({"loss": 1.0}, step=1)
        (tmp_path / "f.txt").write_text("x")
        step.log_artifact(tmp_path / "f.txt")
        assert step.log_hf_model(hf_model(tmp_path / "hf")) is None
        with pytest.raises(FileNotFoundError, match="does not exist"):
            step.log_artifact(tmp_path / "missing.txt")
        with pytest.raises(ValueError, match="alias needs a registered_name"):
            step.log_hf_model(tmp_path / "hf", alias="champion")
    assert step.run_id is None and step.unlogged == []
    with pytest.raises(ValueError, match="run status must be one of"):
        end_pipeline_run(None, None, "DONE")
    assert training_tracking_env(None, None) == {RUN_ID_ENV: ""}
    assert capsys.readouterr().err == ""


def test_a_server_that_is_down_costs_one_warning_and_a_list(tmp_path, capsys):
    import mlflow.tracking  # noqa: F401  (its import time is not what is measured)

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    assert start_pipeline_run(uri, "e", run_name="r", tags={}, params={"a": 1}) is None
    assert time.monotonic() - started < 5
    with step_run(uri, "some-parent-run", "train", params={"lr": 0.1}) as step:
        step.log_metrics({"loss": 1.0}, step=1)
        (tmp_path / "report.html").write_text("<html/>")
        step.log_artifact(tmp_path / "report.html")
    end_pipeline_run(uri, "some-parent-run", "FAILED")
    assert time.monotonic() - started < 8
    assert step.run_id is None
    assert [line.split(":")[0] for line in step.unlogged] == [
        "the run of step train",
        "params lr",
        "metrics loss at step 1",
        f"artifact {tmp_path / 'report.html'}",
    ]
    assert all("unreachable" in line or "no run for step" in line for line in step.unlogged)
    err = capsys.readouterr().err
    assert err.count(f"megasft: warning: MLflow at {uri} unreachable:") == 1
    assert "continuing without tracking" in err


def test_a_silent_server_is_bounded_by_the_timeout(monkeypatch, capsys):
    import mlflow.tracking  # noqa: F401

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert start_pipeline_run(uri, "e", run_name="r", tags={}, params={}) is None
        with step_run(uri, "parent", "prepare") as step:
            step.log_metrics({"rows": 3.0})
        assert time.monotonic() - started < 8  # 1 s timeout, one retry; then skipped
    assert "unreachable" in capsys.readouterr().err and len(step.unlogged) == 2


# --- on a real server ---------------------------------------------------------------------------


def test_pipeline_run_with_nested_steps(mlflow_server, tmp_path):  # noqa: F811
    uri = mlflow_server.uri
    kfp_tags = {"kfp.run_id": "kfp-123", "kfp.pipeline_name": "sft", "kfp.pipeline_version": "v2"}
    parent = start_pipeline_run(
        uri,
        "megasft-test-pipeline",
        run_name="sft-demo",
        tags=kfp_tags,
        params={"seq_length": 128, "train": {"lr": 1e-4, "iters": 3}},
    )
    assert parent is not None
    data = prepared_dataset(tmp_path / "data")
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"instruction": "a", "output": "b"}\n')

    with step_run(uri, parent, "prepare", params={"pack": True}) as prepare:
        prepare.log_metrics({"examples": 6, "rejected": 1, "unknown": None})
        prepare.log_artifact(data / "manifest.json")
        prepare.log_artifact(data / "preview.html", artifact_path="preview")
        prepare.log_artifact(data)  # a directory: its files under data/
        prepare.log_dataset(raw, name="raw", context="source", source=str(raw), digest=SHA)
        prepare.log_dataset(
            data, name="train", context="training", source="s3://bucket/raw.jsonl", digest=SHA
        )
    with step_run(uri, parent, "train") as train, training_tracking(uri, train.run_id):
        tracker = MetricsTracker(None, "unused-experiment", "unused-name")  # as rank 0 does
        tracker.log_params({"lr": 1e-4, "train_iters": 3})
        for step_number in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0 / step_number, "mfu": None}, step=step_number)
        tracker.finish("completed")
    with pytest.raises(RuntimeError, match="evaluation broke"), step_run(uri, parent, "evaluate"):
        raise RuntimeError("evaluation broke")
    assert find_pipeline_run(uri, "megasft-test-pipeline", "kfp-123") == parent  # exit handler
    end_pipeline_run(uri, parent, "FINISHED")

    assert find_pipeline_run(uri, "megasft-test-pipeline", "kfp-999") is None
    assert find_pipeline_run(uri, "megasft-no-such-experiment", "kfp-123") is None
    assert prepare.unlogged == train.unlogged == []
    assert tracker.summary() == {
        "run_id": train.run_id,
        "created_run": False,
        "unsent_metrics": 0,
        "unsent_params": 0,
        "error": None,
    }
    client = mlflow_server.client()
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.info.run_name == "sft-demo"
    assert kfp_tags.items() <= parent_run.data.tags.items()
    assert parent_run.data.tags["mlflow.source.git.commit"] == "0123abcd"
    assert parent_run.data.tags["megasft.version"] == __version__
    assert parent_run.data.params == {"seq_length": "128", "train.lr": "0.0001", "train.iters": "3"}

    children = child_runs(client, parent)
    assert {name: run.info.status for name, run in children.items()} == {
        "prepare": "FINISHED",
        "train": "FINISHED",
        "evaluate": "FAILED",
    }
    assert {run.info.experiment_id for run in children.values()} == {parent_run.info.experiment_id}
    assert children["train"].data.tags["megasft.step"] == "train"

    prepare_run = children["prepare"]
    assert prepare_run.data.params == {"pack": "True"}
    assert prepare_run.data.metrics == {"examples": 6.0, "rejected": 1.0}
    artifacts = {item.path for item in client.list_artifacts(prepare.run_id)}
    assert artifacts == {"manifest.json", "preview", "data"}
    assert {item.path for item in client.list_artifacts(prepare.run_id, "data")} == {
        "data/manifest.json",
        "data/preview.html",
    }
    inputs = {item.dataset.name: item for item in prepare_run.inputs.dataset_inputs}
    assert set(inputs) == {"raw", "train"}
    for dataset_input in inputs.values():
        tags = {tag.key: tag.value for tag in dataset_input.tags}
        assert dataset_input.dataset.digest == mlflow_digest(SHA) == "ab" * 16
        assert tags["megasft.digest"] == SHA
        assert json.loads(dataset_input.dataset.profile)["source_digest"] == SHA
    train_input = inputs["train"]
    assert {tag.key: tag.value for tag in train_input.tags}["mlflow.data.context"] == "training"
    assert train_input.dataset.source_type == "s3"
    assert json.loads(train_input.dataset.source) == {"uri": "s3://bucket/raw.jsonl"}
    profile = json.loads(train_input.dataset.profile)
    assert (profile["tokens"], profile["loss_tokens"], profile["rejected"]) == (360, 140, 1)
    assert profile["splits"]["train"] == {
        "rows": 4,
        "examples": 5,
        "tokens": 300,
        "loss_tokens": 120,
    }
    columns = json.loads(train_input.dataset.schema)["mlflow_colspec"]
    assert [column["name"] for column in columns] == ["input_ids", "loss_mask", "seq_lengths"]
    raw_input = inputs["raw"]
    assert raw_input.dataset.source_type == "local"
    assert json.loads(raw_input.dataset.source) == {"uri": str(raw)}
    assert json.loads(raw_input.dataset.profile)["bytes"] == raw.stat().st_size

    train_run = children["train"]
    assert train_run.data.params == {"lr": "0.0001", "train_iters": "3"}
    history = client.get_metric_history(train.run_id, "loss")
    assert [(point.step, point.value) for point in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_model_is_logged_and_registered_with_an_alias(mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    import mlflow.artifacts

    uri = mlflow_server.uri
    model_dir = hf_model(tmp_path / "hf")
    parent = start_pipeline_run(uri, "megasft-test-models", run_name="r", tags={}, params={})
    with step_run(uri, parent, "evaluate") as evaluate:
        assert evaluate.log_hf_model(model_dir) is None  # gate failed: logged, not registered
    with step_run(uri, parent, "register") as register:
        first = register.log_hf_model(model_dir, registered_name="megasft-test", alias="champion")
        second = register.log_hf_model(model_dir, registered_name="megasft-test", alias="champion")
    assert (first, second) == ("1", "2") and register.unlogged == evaluate.unlogged == []
    assert evaluate.model_uri.startswith("models:/m-")

    client = mlflow_server.client()
    version = client.get_model_version_by_alias("megasft-test", "champion")
    version_one = client.get_model_version("megasft-test", "1")
    assert (version.version, version.run_id) == ("2", register.run_id)
    assert version.source == register.model_uri
    outputs = client.get_run(register.run_id).outputs.model_outputs
    assert {f"models:/{output.model_id}" for output in outputs} == {
        register.model_uri,
        version_one.source,
    }
    logged = client.get_logged_model(register.model_uri.removeprefix("models:/"))
    assert logged.tags["hf.architectures"] == "LlamaForCausalLM"

    # The registry resolves the version's models:/<id> source with the default tracking URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            "models:/megasft-test@champion", dst_path=str(tmp_path / "download")
        )
    )
    files = sorted(path.name for path in model_dir.iterdir())
    assert sorted(path.name for path in downloaded.iterdir()) == files
    for name in files:
        assert (downloaded / name).read_bytes() == (model_dir / name).read_bytes()


def test_kfp_runs_are_used_instead_of_new_ones(mlflow_server, monkeypatch):  # noqa: F811
    """KFP's integration made a parent run and this task's nested run, and says so in env."""
    uri = mlflow_server.uri
    client = mlflow_server.client()
    experiment_id = client.create_experiment("kfp-default")
    kfp_parent = client.create_run(experiment_id, run_name="kfp-pipeline-run").info.run_id
    task_tags = {"mlflow.parentRunId": kfp_parent}
    kfp_task = client.create_run(experiment_id, run_name="train-task", tags=task_tags)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", kfp_task.info.run_id)

    parent = start_pipeline_run(
        None, "megasft-not-created", run_name="x", tags={"kfp.run_id": "7"}, params={"a": 1}
    )
    assert parent == kfp_parent
    with step_run(None, parent, "train") as train:
        tracker = MetricsTracker(None, "unused", "unused")  # KFP's MLFLOW_RUN_ID, no env of ours
        tracker.log_metrics({"loss": 2.0}, step=1)
        tracker.finish("completed")
    assert find_pipeline_run(None, "megasft-not-created", "7") == kfp_parent
    end_pipeline_run(None, parent, "FINISHED")

    assert train.run_id == kfp_task.info.run_id and train.unlogged == []
    assert client.get_experiment_by_name("megasft-not-created") is None
    assert len(client.search_runs([experiment_id])) == 2  # no run of ours
    parent_run = client.get_run(kfp_parent)
    assert parent_run.data.tags["kfp.run_id"] == "7" and parent_run.data.params == {"a": "1"}
    assert parent_run.info.status == "RUNNING"  # KFP ends its runs, not megasft
    task_run = client.get_run(kfp_task.info.run_id)
    assert task_run.info.status == "RUNNING" and task_run.data.tags["megasft.step"] == "train"
    assert task_run.data.metrics == {"loss": 2.0}


def test_a_run_id_from_the_environment_becomes_the_parent(mlflow_server, monkeypatch):  # noqa: F811
    """MLFLOW_RUN_ID without a parent (a user's own run): it is the pipeline run, and steps nest
    under it."""
    client = mlflow_server.client()
    experiment_id = client.create_experiment("user-runs")
    users_run = client.create_run(experiment_id, run_name="notebook").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", users_run)
    uri = mlflow_server.uri

    parent = start_pipeline_run(uri, "unused", run_name="x", tags={}, params={})
    with step_run(uri, parent, "prepare") as prepare:
        prepare.log_metrics({"rows": 1.0})
    end_pipeline_run(uri, parent, "FINISHED")

    assert parent == users_run
    assert prepare.run_id != users_run
    assert set(child_runs(client, users_run)) == {"prepare"}
    assert client.get_run(users_run).info.status == "RUNNING"


def test_a_refused_request_is_skipped_alone(mlflow_server, capsys):  # noqa: F811
    uri = mlflow_server.uri
    parent = start_pipeline_run(uri, "megasft-test-refusals", run_name="r", tags={}, params={})
    with step_run(uri, parent, "train", params={"lr": 0.1}) as step:
        step.log_params({"lr": 0.2})  # MLflow params are write-once
        step.log_metrics({"loss": 1.0}, step=1)
    assert len(step.unlogged) == 1 and step.unlogged[0].startswith("params lr: refused by MLflow")
    run = mlflow_server.client().get_run(step.run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 1.0}
    assert run.info.status == "FINISHED"
    assert f"MLflow at {uri} refused params lr" in capsys.readouterr().err


def test_a_server_that_dies_mid_run(mlflow_server, tmp_path, capsys):  # noqa: F811
    relay = TcpRelay(int(mlflow_server.uri.rsplit(":", 1)[1]))
    uri = relay.uri
    parent = start_pipeline_run(uri, "megasft-test-dies", run_name="r", tags={}, params={})
    (tmp_path / "metrics.json").write_text("{}")
    with step_run(uri, parent, "train") as step, training_tracking(uri, step.run_id):
        tracker = MetricsTracker(None, "unused", "unused")
        tracker.log_metrics({"loss": 1.0}, step=1)
        step.log_metrics({"tokens": 10.0}, step=1)
        relay.cut()
        started = time.monotonic()
        for step_number in (2, 3, 4):
            tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=step_number)
        step.log_metrics({"tokens": 20.0}, step=2)
        step.log_artifact(tmp_path / "metrics.json")
        tracker.finish("completed")
    end_pipeline_run(uri, parent, "FINISHED")
    assert time.monotonic() - started < 8

    assert tracker.summary()["unsent_metrics"] == 6 and tracker.summary()["error"]
    assert [line.split(":")[0] for line in step.unlogged] == [
        "metrics tokens at step 2",
        f"artifact {tmp_path / 'metrics.json'}",
        "the end of step train (FINISHED)",
    ]
    err = capsys.readouterr().err
    assert err.count(f"MLflow at {uri} unreachable") == 1
    assert err.count("MLflow tracking failed") == 1
    client = mlflow_server.client()
    run = client.get_run(step.run_id)
    assert run.data.metrics == {"loss": 1.0, "tokens": 10.0} and run.info.status == "RUNNING"


def test_a_step_without_a_pipeline_run_lists_what_it_did_not_log(capsys):
    """Tracking is configured but the pipeline run could not be made (an earlier step's
    server trouble): the step's calls are listed, not attempted."""
    with step_run("http://127.0.0.1:9", None, "train", params={"lr": 0.1}) as step:
        step.log_metrics({"loss": 1.0}, step=3)
    assert step.unlogged == [
        "params lr: no pipeline run to nest under (tracking unavailable)",
        "metrics loss at step 3: no pipeline run to nest under (tracking unavailable)",
    ]
    assert capsys.readouterr().err == ""
