"""The compiled pipeline (KFP IR YAML): the DAG, caching, retries, the gate, the exit handler,
the volumes and the images, read from what `megasft pipeline compile` writes."""

from __future__ import annotations

import pytest
import yaml

from megasft.cli import main


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "sft.yaml"
    assert main(["pipeline", "compile", "--output", str(path)]) == 0
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(pipeline):
    return pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_the_dag_wires_the_stages_in_order(compiled):
    pipeline, _ = compiled
    assert pipeline["pipelineInfo"]["name"] == "megasft-sft"
    tasks = _tasks(pipeline)
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert depends["validate"] == set()
    # tokenize-and-mask and the hf -> megatron conversion both wait only for validate: parallel.
    assert depends["tokenize-and-mask"] == {"validate"}
    assert depends["checkpoint-convert"] == {"validate"}
    assert depends["train"] == {"validate", "tokenize-and-mask", "checkpoint-convert"}
    assert "train" in depends["checkpoint-convert-2"]  # the export
    assert {"checkpoint-convert-2", "train"} <= depends["evaluate"]
    assert tasks["checkpoint-convert"]["taskInfo"]["name"] == "checkpoint-convert (hf -> megatron)"
    assert tasks["checkpoint-convert-2"]["taskInfo"]["name"] == "export (megatron -> hf)"


def test_register_runs_only_when_the_gate_passed(compiled):
    pipeline, _ = compiled
    condition = _tasks(pipeline)["condition-2"]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    )
    inner = pipeline["components"]["comp-condition-2"]["dag"]["tasks"]
    assert set(inner) == {"register"}


def test_the_exit_handler_runs_whatever_happened(compiled):
    pipeline, _ = compiled
    root = pipeline["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finish"}
    assert root["finish"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inputs = pipeline["components"]["comp-finish"]["inputDefinitions"]["parameters"]
    assert inputs["status"]["parameterType"] == "TASK_FINAL_STATUS"


def test_caching_only_on_the_content_keyed_steps_and_retries_where_transient(compiled):
    pipeline, _ = compiled
    tasks = _tasks(pipeline)
    cached = {
        name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")
    }
    assert cached == {"tokenize-and-mask", "checkpoint-convert"}
    # Their cache keys include the content hashes that validate computes.
    for name, digest in (
        ("tokenize-and-mask", "data_digest"),
        ("checkpoint-convert", "content_digest"),
    ):
        parameter = tasks[name]["inputs"]["parameters"][digest]["taskOutputParameter"]
        assert parameter["producerTask"] == "validate"
    retried = {
        name for name, task in tasks.items() if task.get("retryPolicy", {}).get("maxRetryCount")
    }
    assert retried >= {"tokenize-and-mask", "checkpoint-convert", "train", "checkpoint-convert-2"}
    assert "validate" not in retried  # a bad configuration does not get better by retrying


def test_volumes_and_the_downward_api_for_the_cluster(compiled):
    _, executors = compiled
    claims = {
        name: {
            mount["pvcNameParameter"]["runtimeValue"]["constant"]
            for mount in spec.get("pvcMount", [])
        }
        for name, spec in executors.items()
    }
    assert claims["exec-train"] == {"megasft-data", "megasft-checkpoints"}
    assert claims["exec-tokenize-and-mask"] == {"megasft-data"}
    fields = {item["name"]: item["fieldPath"] for item in executors["exec-train"]["fieldPathAsEnv"]}
    assert fields == {
        "POD_NAME": "metadata.name",
        "POD_UID": "metadata.uid",
        "POD_NAMESPACE": "metadata.namespace",
    }


def test_every_step_runs_in_the_image_megasft_images_names(compiled):
    pipeline, _ = compiled
    from megasft.images import image_for

    executors = pipeline["deploymentSpec"]["executors"]
    images = {spec["container"]["image"] for spec in executors.values()}
    assert images == {image_for("cpu").reference}
    # Nothing is pip-installed when a step starts (the image carries megasft and kfp).
    for spec in executors.values():
        assert "pip install" not in " ".join(spec["container"]["command"])
