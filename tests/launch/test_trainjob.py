"""The TrainJob the `trainjob` launcher builds: valid against Kubeflow Trainer v2.3.0's CRD and its
rules, shaped as the run asks, on the runtime the overlays ship; and its settings, checked.

The CRDs are ../shared/schemas/kubeflow-trainer-v2.3.0 (skipped without them); the runtimes are
the overlays rendered by kustomize (skipped without kustomize v5).
"""

from __future__ import annotations

import argparse

import kubernetes_validate
import pytest
import yaml

from megasft.errors import ConfigError
from megasft.launch.job_request import JobRequest
from megasft.launch.registry import TrainingPlan, launcher_from_settings, launcher_section
from megasft.launch.trainjob import (
    CLAIMS,
    RESOURCES,
    RUNTIMES,
    TRAINJOB,
    TrainJobLauncher,
    build_trainjob,
)
from pipelines.sft_pipeline import CHECKPOINT_CLAIM, DATA_CLAIM
from tests.conftest import REPO
from tests.deploy.crds import schema_errors, trainer_rule_errors, trainer_validator
from tests.deploy.rendering import find_kustomize, only, pod_specs, render

RUN_ID = "6f0b7f5c-0000-4000-8000-000000000001"
NAME = "megasft-train-0123456789ab"
TRAIN_ARGS = (
    "--data=/checkpoints/runs/x/dataset",
    "--load=/checkpoints/runs/x/base",
    "--save=/checkpoints/runs/x/checkpoints",
    "--train-iters=100",
)


@pytest.fixture(autouse=True)
def no_owner(monkeypatch):
    for variable in ("POD_NAME", "POD_UID", "KFP_POD_NAME", "KFP_POD_UID", "POD_NAMESPACE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)


def make_request(**overrides) -> JobRequest:
    settings = {"name": NAME, "namespace": "megasft", "train_args": TRAIN_ARGS}
    return JobRequest(**{**settings, **overrides})


def plan(**settings) -> TrainingPlan:
    return TrainingPlan(
        settings={"train_iters": 100, "tensor_parallel": 2, **settings},
        dataset=REPO / "dataset",
        base_checkpoint=REPO / "base",
        output=REPO / "output",
        run_id=RUN_ID,
    )


def node_patch(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]["spec"]


def assert_valid(job: dict) -> None:
    errors = schema_errors(trainer_validator("TrainJob"), job)
    assert not errors, "\n".join(errors)
    assert not trainer_rule_errors(job)
    # The CRD leaves metadata to the API server: check it as the ObjectMeta it is.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": job["metadata"]}
    kubernetes_validate.validate(carrier, "1.30", strict=True)


@pytest.mark.parametrize("nodes", [1, 4])
def test_the_trainjob_validates_and_has_the_requested_shape(nodes):
    launcher = TrainJobLauncher(nodes=nodes)
    job = build_trainjob(launcher.job_template(), make_request(nodes=nodes))
    assert_valid(job)
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "megasft-mi300x",
    }
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, 8)
    assert "image" not in trainer  # the runtime's, which the cluster's overlay set
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "32", "memory": "256Gi", "amd.com/gpu": "8"},
        "limits": {"memory": "512Gi", "amd.com/gpu": "8"},
    }
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"][:2] == ["-m", "megasft.train.worker"]
    from megasft.train.cli import add_train_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_train_arguments(parser)
    flags = parser.parse_args(trainer["args"][2:])
    assert (flags.nproc, flags.nodes, flags.save) == (8, nodes, "/checkpoints/runs/x/checkpoints")
    assert flags.require_accelerator  # a job that asked for GPUs never trains on the CPU
    # The claims the step mounts, at the same paths: the data read-only, the workspace writable.
    pod = node_patch(job)
    assert pod["volumes"] == [
        {"name": "megasft-data", "persistentVolumeClaim": {"claimName": "megasft-data", "readOnly": True}},
        {"name": "megasft-checkpoints", "persistentVolumeClaim": {"claimName": "megasft-checkpoints"}},
    ]  # fmt: skip
    assert pod["containers"] == [
        {
            "name": "node",
            "volumeMounts": [
                {"name": "megasft-data", "mountPath": "/data", "readOnly": True},
                {"name": "megasft-checkpoints", "mountPath": "/checkpoints"},
            ],
        }
    ]
    assert set(pod) == {"volumes", "containers"}  # scheduling stays the runtime's
    assert job["metadata"] == {
        "name": NAME,
        "namespace": "megasft",
        "labels": {
            "app.kubernetes.io/name": "megasft-train",
            "app.kubernetes.io/component": "training",
            "app.kubernetes.io/part-of": "megasft",
        },
    }


def test_the_claims_are_the_steps_and_the_manifests():
    assert dict([DATA_CLAIM, CHECKPOINT_CLAIM]) == CLAIMS  # pipelines/sft_pipeline.py
    documents = yaml.safe_load_all((REPO / "manifests/base/storage.yaml").read_text())
    claims = {claim["metadata"]["name"]: claim for claim in documents}
    for claim in CLAIMS:
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it


def test_the_owner_the_image_and_the_settings_of_a_cluster_reach_the_job(monkeypatch):
    monkeypatch.setenv("POD_NAME", "sft-pipeline-abc-system-container-impl-123")
    monkeypatch.setenv("POD_UID", "6f0b7f5c-0000-4000-8000-000000000002")
    launcher = launcher_from_settings(
        {
            "kind": "trainjob",
            "gpu_resource": "nvidia.com/gpu",
            "gpus_per_node": 4.0,  # KFP's doubles
            "image": "registry.acme.example/ml/train-cuda@sha256:" + "0" * 64,
            "runtime_kind": "TrainingRuntime",
            "node_selector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "ml",
                    "effect": "NoSchedule",
                    "tolerationSeconds": 60.0,
                }
            ],  # fmt: skip
            "service_account": "megasft-training",
            "env": {"NCCL_DEBUG": "INFO"},
            "resources_per_node": {"requests": {"cpu": 16.0, "memory": "128Gi"}},
            "claims": {"megasft-checkpoints": "/checkpoints", "team-datasets": "/datasets"},
        }
    )
    job = launcher.render(plan(nproc=4))
    assert_valid(job)
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == launcher.image
    assert trainer["env"] == [{"name": "NCCL_DEBUG", "value": "INFO"}]
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "4"},
        "limits": {"nvidia.com/gpu": "4"},
    }
    assert job["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    assert job["spec"]["runtimeRef"]["name"] == "megasft-cuda"
    pod = node_patch(job)
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod["tolerations"][0]["tolerationSeconds"] == 60
    assert pod["serviceAccountName"] == "megasft-training"
    assert [volume["persistentVolumeClaim"].get("readOnly") for volume in pod["volumes"]] == [
        None,
        True,
    ]
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "sft-pipeline-abc-system-container-impl-123",
            "uid": "6f0b7f5c-0000-4000-8000-000000000002",
        }
    ]
    assert job["metadata"]["labels"]["megasft/run"] == job["metadata"]["name"]


def test_settings_are_saved_only_where_set():
    launcher = launcher_from_settings({"kind": "trainjob", "nodes": 2})
    assert launcher_section(launcher) == {
        "kind": "trainjob",
        "nodes": 2,
        "gpus_per_node": 8,
        "gpu_resource": "amd.com/gpu",
        "workspace": "/checkpoints/runs",
    }
    assert launcher_from_settings(launcher_section(launcher)) == launcher


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"template": "t.yaml"}, "launcher.template is the PyTorchJob template"),
        ({"gpu_resource": "intel.com/gpu"}, "launcher.runtime: no runtime of ours runs on intel"),
        ({"runtime": "Megasft ROCm"}, "launcher.runtime 'Megasft ROCm' is not a valid object"),
        ({"runtime_kind": "Runtime"}, "use ClusterTrainingRuntime or TrainingRuntime"),
        ({"claims": {"data": "/data"}}, "launcher.workspace /checkpoints/runs is on none"),
        ({"claims": {"Data": "/data"}}, "'Data' is not a claim name"),
        (
            {"claims": {"ckpt": "checkpoints"}},
            "launcher.claims.ckpt: 'checkpoints' is not an absolute path",
        ),
        ({"node_selector": {"a": 1}}, "launcher.node_selector: expected names with string"),
        ({"env": {"A=B": "1"}}, "launcher.env: expected names"),
        ({"tolerations": [{"key": "a", "taint": "b"}]}, "launcher.tolerations: .* is not a toler"),
        ({"resources_per_node": {"requests": {"amd.com/gpu": 8}}}, "leave amd.com/gpu out"),
        ({"resources_per_node": {"request": {}}}, "give `requests` and/or `limits`"),
        ({"service_account": "A"}, "launcher.service_account 'A'"),
        ({"image": ""}, "launcher.image '': give an image reference"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ConfigError, match=message):
        launcher_from_settings({"kind": "trainjob", **settings})


def test_train_settings_must_fit_the_nodes_and_gpus():
    launcher = TrainJobLauncher(nodes=2)
    with pytest.raises(ConfigError, match="train.nproc 4 differs from launcher.gpus_per_node 8"):
        launcher.render(plan(nproc=4))
    with pytest.raises(ConfigError, match="train.nodes 1 differs from launcher.nodes 2"):
        launcher.render(plan(nodes=1))
    with pytest.raises(ConfigError, match=r"= 3 does not divide 16"):
        launcher.render(plan(tensor_parallel=3))


def test_a_save_off_the_claims_and_a_foreign_template_are_refused():
    template = TrainJobLauncher().job_template()
    with pytest.raises(ConfigError, match="--save=/tmp/x is not on a writable PersistentVolume"):
        build_trainjob(template, make_request(train_args=("--data=/d", "--load=/l", "--save=/tmp/x")))  # fmt: skip
    with pytest.raises(ConfigError, match="not a trainer.kubeflow.org/v1alpha1 TrainJob"):
        build_trainjob({**template, "apiVersion": "kubeflow.org/v1"}, make_request())
    with pytest.raises(ConfigError, match="names no training runtime"):
        build_trainjob({**template, "spec": {"trainer": template["spec"]["trainer"]}}, make_request())  # fmt: skip


def test_the_trainer_rules_would_catch_a_broken_job():
    job = build_trainjob(TrainJobLauncher().job_template(), make_request())
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["metadata"]["name"] = "9-" + NAME
    broken["spec"]["trainer"]["numProcPerNode"] = "auto"  # an integer in v2.3
    node_patch(broken)["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    assert schema_errors(trainer_validator("TrainJob"), broken) == [
        "spec.trainer.numProcPerNode: 'auto' is not of type 'integer'"
    ]
    assert trainer_rule_errors(broken) == [
        f"metadata.name '9-{NAME}' is not an RFC 1035 label of at most 63",
        "runtimePatches: env of node is forbidden",
    ]


@pytest.fixture(scope="module")
def runtimes() -> dict[str, dict]:
    command, reason = find_kustomize()
    if command is None:
        pytest.skip(reason)
    rendered = {}
    for overlay in ("overlays/mi300x", "overlays/cuda"):
        runtime = only(render(command, overlay), "ClusterTrainingRuntime")
        rendered[runtime["metadata"]["name"]] = runtime
    return rendered


def test_the_default_runtimes_are_the_overlays_and_match_the_jobs_resources(runtimes):
    assert set(runtimes) == set(RUNTIMES.values())
    for gpu_resource, name in RUNTIMES.items():
        ((_, pod),) = pod_specs(runtimes[name])
        (container,) = pod["containers"]
        resources = container["resources"]
        # The job's resourcesPerNode replaces these: they must say the same less the GPUs.
        without_gpus = {
            kind: {key: value for key, value in amounts.items() if key != gpu_resource}
            for kind, amounts in resources.items()
        }
        assert without_gpus == RESOURCES, name
        assert resources["limits"][gpu_resource] == "8"
        job = build_trainjob(TrainJobLauncher(gpu_resource=gpu_resource).job_template(), make_request(gpu_resource=gpu_resource))  # fmt: skip
        assert job["spec"]["runtimeRef"]["name"] == name


def test_the_kind_names_trainers_resources():
    assert (TRAINJOB.api_version, TRAINJOB.plural, TRAINJOB.container) == (
        "trainer.kubeflow.org/v1alpha1",
        "trainjobs",
        "node",
    )
    assert (TRAINJOB.succeeded, TRAINJOB.failed) == ("Complete", "Failed")
