"""The PyTorchJob the launcher builds: valid against the training operator's CRD and its admission
rules, shaped as the request says, and everything else as the cluster's template has it.

The templates are components/pytorchjob's template as it is and the overlay for the v1 operator
(manifests/examples/training-operator-v1) rendered by kustomize (skipped without kustomize v5);
the CRD is ../shared/schemas (skipped without it).
"""

from __future__ import annotations

import argparse
import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from megasft.errors import ConfigError
from megasft.launch.job_api import load_template
from megasft.launch.job_request import MAX_NAME_LENGTH, JobRequest, job_name
from megasft.launch.pytorchjob import PYTORCHJOB, build_pytorchjob
from tests.conftest import REPO, shared_path
from tests.deploy.crds import strict
from tests.deploy.rendering import find_kustomize, only, render, render_composed
from tests.deploy.test_manifests import admission_errors, training_container

BASE_TEMPLATE = REPO / "manifests/components/pytorchjob/pytorchjob-template.yaml"
TRAIN_ARGS = (
    "--data=/data/sft",
    "--load=/checkpoints/base-mcore",
    "--save=/checkpoints/runs/megasft-train-0123456789ab",
    "--train-iters=100",
    "--tracking-uri=http://megasft-mlflow:5000",
)


@pytest.fixture(scope="module")
def crd_schema() -> jsonschema.Draft7Validator:
    text = shared_path("schemas", "kubeflow.org_pytorchjobs.yaml").read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 600 kB
    (version,) = [entry for entry in crd["spec"]["versions"] if entry["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rendered_template(tmp_path_factory) -> dict:
    command, reason = find_kustomize()
    if command is None:
        pytest.skip(reason)
    return only(render(command, "examples/training-operator-v1"), "PyTorchJob")


@pytest.fixture(params=["base", "mi300x"])
def template(request) -> dict:
    if request.param == "base":
        return load_template(PYTORCHJOB, BASE_TEMPLATE)
    return request.getfixturevalue("rendered_template")


def make_request(**overrides) -> JobRequest:
    settings = {
        "name": "megasft-train-0123456789ab",
        "namespace": "megasft",
        "train_args": TRAIN_ARGS,
        "owner_name": None,
        "owner_uid": None,
    }
    return JobRequest(**{**settings, **overrides})


def worker_flags(container: dict) -> argparse.Namespace:
    from megasft.train.cli import add_train_arguments

    assert container["args"][:2] == ["-m", "megasft.train.worker"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_train_arguments(parser)
    return parser.parse_args(container["args"][2:])


def schema_errors(schema: jsonschema.Draft7Validator, job: dict) -> list[str]:
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in schema.iter_errors(job)
    ]


@pytest.mark.parametrize(("nodes", "workers"), [(1, None), (4, 3)])
def test_the_job_validates_and_has_the_requested_shape(crd_schema, template, nodes, workers):
    job = build_pytorchjob(template, make_request(nodes=nodes))
    assert not schema_errors(crd_schema, job)
    assert not admission_errors(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas") == workers
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"]["suspend"] is False
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["limits"]["amd.com/gpu"] == resources["requests"]["amd.com/gpu"] == "8"
        flags = worker_flags(container)
        assert (flags.nproc, flags.nodes) == (8, nodes)
        assert flags.save == "/checkpoints/runs/megasft-train-0123456789ab"
        assert flags.tracking_uri == "http://megasft-mlflow:5000"
        assert container["image"] == "registry.example.com/megasft/train-rocm:0.1.0"


def test_only_the_listed_fields_change(rendered_template):
    job = build_pytorchjob(rendered_template, make_request(nodes=2, gpus_per_node=4))
    expected = copy.deepcopy(rendered_template)
    del expected["metadata"]
    expected["spec"]["runPolicy"]["suspend"] = False
    expected["spec"]["nprocPerNode"] = "4"
    for replica in expected["spec"]["pytorchReplicaSpecs"].values():
        container = replica["template"]["spec"]["containers"][0]
        container["args"] = [
            *container["args"][:2], *TRAIN_ARGS, "--require-accelerator", "--nproc=4", "--nodes=2"
        ]  # fmt: skip
        for kind in ("requests", "limits"):
            container["resources"][kind]["amd.com/gpu"] = "4"
    assert {key: value for key, value in job.items() if key != "metadata"} == expected
    # The cluster's settings come through untouched: RCCL, /dev/shm, scheduling, retries.
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"amd.com/gpu.device-id": "74a1"}
    assert pod["tolerations"][0]["key"] == "amd.com/gpu"
    assert {"NCCL_MIN_NCHANNELS", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= {
        variable["name"] for variable in training_container(job)["env"]
    }
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 259200


def test_metadata_is_the_runs_and_the_owner_comes_from_the_downward_api(
    rendered_template, monkeypatch
):
    template = copy.deepcopy(rendered_template)
    template["metadata"].update(
        uid="template-uid",
        resourceVersion="42",
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"},
    )
    template["status"] = {"conditions": [{"type": "Suspended", "status": "True"}]}
    monkeypatch.setenv("POD_NAME", "sft-pipeline-abc-system-container-impl-123")
    monkeypatch.setenv("POD_UID", "6f0b7f5c-0000-4000-8000-000000000001")
    request = JobRequest(
        name="megasft-train-0123456789ab",
        namespace="team-a",
        train_args=TRAIN_ARGS,
        labels={"pipelines.kubeflow.org/run-id": "6f0b7f5c-run"},
    )
    job = build_pytorchjob(template, request)
    assert job["metadata"] == {
        "name": "megasft-train-0123456789ab",
        "namespace": "team-a",
        "labels": {
            "app.kubernetes.io/name": "megasft-train",
            "app.kubernetes.io/component": "training",
            "app.kubernetes.io/part-of": "megasft",
            "pipelines.kubeflow.org/run-id": "6f0b7f5c-run",
        },
        "ownerReferences": [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": "sft-pipeline-abc-system-container-impl-123",
                "uid": "6f0b7f5c-0000-4000-8000-000000000001",
            }
        ],
    }
    assert "status" not in job
    # The CRD leaves metadata to the API server: check it as the ObjectMeta it is.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": job["metadata"]}
    kubernetes_validate.validate(carrier, "1.30", strict=True)


def test_kfp_pod_variables_name_the_owner_when_ours_are_absent(monkeypatch):
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.delenv("POD_UID", raising=False)
    monkeypatch.setenv("KFP_POD_NAME", "step-pod")
    monkeypatch.setenv("KFP_POD_UID", "uid-1")
    monkeypatch.setenv("KFP_NAMESPACE", "team-b")
    request = JobRequest(name="megasft-train-x", train_args=TRAIN_ARGS)
    assert (request.owner_name, request.owner_uid, request.namespace) == (
        "step-pod",
        "uid-1",
        "team-b",
    )
    monkeypatch.delenv("KFP_POD_UID")
    request = JobRequest(name="megasft-train-x", train_args=TRAIN_ARGS)
    assert request.owner_name is None  # a name without a uid cannot make an owner reference
    job = build_pytorchjob(load_template(PYTORCHJOB, BASE_TEMPLATE), request)
    assert "ownerReferences" not in job["metadata"]


def test_an_explicit_image_and_a_cuda_template(crd_schema, tmp_path):
    command, reason = find_kustomize()
    if command is None:
        pytest.skip(reason)
    components = ["components/pytorchjob", "components/cuda", "components/worker-from-master"]
    template = only(render_composed(command, tmp_path, ["base"], components), "PyTorchJob")
    image = "ghcr.io/acme/megasft-train@sha256:" + "0" * 64
    request = make_request(gpu_resource="nvidia.com/gpu", image=image, nodes=2, gpus_per_node=2)
    job = build_pytorchjob(template, request)
    assert not schema_errors(crd_schema, job)
    container = training_container(job)
    assert container["image"] == image
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    with pytest.raises(
        ConfigError, match="Master requests nvidia.com/gpu, but the request is for amd.com"
    ):
        build_pytorchjob(template, make_request())


def test_job_names_are_deterministic_dns_labels():
    first = job_name("6f0b7f5c-0000-4000-8000-000000000001", "train")
    assert first == job_name("6f0b7f5c-0000-4000-8000-000000000001", "train")
    assert first != job_name("6f0b7f5c-0000-4000-8000-000000000001", "train-2")
    assert first != job_name("6f0b7f5c-0000-4000-8000-000000000002", "train")
    assert first.startswith("megasft-train-") and len(first) == len("megasft-train-") + 12
    make_request(name=first)  # accepted as a job name
    with pytest.raises(ConfigError, match="DNS-1035"):
        job_name("run", prefix="Megasft")
    with pytest.raises(ConfigError, match="non-empty"):
        job_name("", "train")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Train_1"}, "not a DNS-1035 label"),
        ({"name": "a" * (MAX_NAME_LENGTH + 1)}, "at most 51"),
        ({"namespace": "Team A"}, "not a valid namespace"),
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"gpu_resource": "gpu"}, "extended resource name"),
        ({"owner_name": "pod"}, "owner_name and owner_uid go together"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
        ({"labels": {"run": "a b"}}, "label run="),
        ({"train_args": ("--data=/data/sft", "--load=/x")}, "needs --save"),
        ({"train_args": (*TRAIN_ARGS, "--learning-rate=1")}, "--learning-rate=1 is not a flag"),
        (
            {"train_args": (*TRAIN_ARGS, "--nproc=4")},
            "--nproc=4 but the request's gpus_per_node is 8",
        ),
        ({"train_args": (*TRAIN_ARGS, "--nodes", "3"), "nodes": 2}, "--nodes=3 but"),
        ({"train_args": (*TRAIN_ARGS, "--train-iters=many")}, "invalid int value"),
    ],
)
def test_requests_are_checked_on_construction(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_request(**overrides)


def test_flags_that_agree_are_kept_and_not_added_twice():
    request = make_request(train_args=(*TRAIN_ARGS, "--nproc", "8"), nodes=2)
    assert request.worker_args == [
        *TRAIN_ARGS,
        "--nproc",
        "8",
        "--require-accelerator",
        "--nodes=2",
    ]


@pytest.mark.parametrize(
    "save", ["/tmp/out", "/data/sft/out", "/checkpointsx/run"], ids=["pod", "read-only", "prefix"]
)
def test_save_must_be_on_a_writable_claim(save):
    request = make_request(train_args=("--data=/data/sft", "--load=/x", f"--save={save}"))
    with pytest.raises(
        ConfigError, match=f"--save={save} is not on a writable PersistentVolumeClaim"
    ):
        build_pytorchjob(load_template(PYTORCHJOB, BASE_TEMPLATE), request)


def test_templates_that_cannot_be_used_are_refused(tmp_path):
    template = load_template(PYTORCHJOB, BASE_TEMPLATE)
    broken = copy.deepcopy(template)
    broken["kind"] = "TFJob"
    with pytest.raises(ConfigError, match="not a kubeflow.org/v1 PyTorchJob"):
        build_pytorchjob(broken, make_request())
    broken = copy.deepcopy(template)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"] = [
        "train.py"
    ]
    with pytest.raises(ConfigError, match="do not run megasft.train.worker"):
        build_pytorchjob(broken, make_request())
    broken = copy.deepcopy(template)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = (
        "x"
    )
    with pytest.raises(ConfigError, match="no container named 'pytorch'"):
        build_pytorchjob(broken, make_request())
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump_all([template, template]))
    with pytest.raises(ConfigError, match="holds 2 PyTorchJobs"):
        load_template(PYTORCHJOB, two)


def test_a_rendered_overlay_file_is_a_template(rendered_template, tmp_path):
    rendered = tmp_path / "mi300x.yaml"
    rendered.write_text(
        yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Namespace"}, rendered_template])
    )
    assert load_template(PYTORCHJOB, rendered) == rendered_template


def test_an_owner_in_another_namespace_is_refused(monkeypatch):
    """Kubernetes would take the owner for a missing one and delete the job at once."""
    monkeypatch.setenv("POD_NAME", "step-pod")
    monkeypatch.setenv("POD_UID", "6f0b7f5c-0000-4000-8000-000000000002")
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    with pytest.raises(ConfigError, match="owner reference cannot cross namespaces"):
        JobRequest(name="megasft-train-0123456789ab", namespace="megasft", train_args=TRAIN_ARGS)
    same = JobRequest(name="megasft-train-0123456789ab", train_args=TRAIN_ARGS)
    assert same.namespace == "team-a" and same.owner_name == "step-pod"
