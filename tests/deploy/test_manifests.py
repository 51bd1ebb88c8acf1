"""Every overlay renders, and every object it renders is what a cluster would accept.

Core kinds are checked against the Kubernetes OpenAPI schemas (bundled by kubernetes-validate, so
no cluster or network is needed), the ClusterTrainingRuntimes against Kubeflow Trainer v2.3.0's CRD
schema and rules, the PyTorchJob against the training operator's CRD schema and its admission
rules. Applying them to a cluster is the one step that is not exercised here.
"""

from __future__ import annotations

import argparse
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from megasft.images import IMAGES, image_for
from megasft.pipeline.config import load_pipeline_config
from tests.conftest import REPO, shared_path
from tests.deploy.commands import megasft_subcommands
from tests.deploy.crds import schema_errors, strict, trainer_rule_errors, trainer_validator
from tests.deploy.dockerfiles import parse
from tests.deploy.rendering import (
    CLUSTER_SCOPED,
    CUSTOM_KINDS,
    IMAGE_UID,
    MANIFESTS,
    NAMESPACE,
    OVERLAYS,
    PYTORCHJOB_OVERLAYS,
    container_arguments,
    find_kustomize,
    objects_of,
    only,
    pod_specs,
    render,
)

# The oldest Kubernetes the prerequisites name (docs/deploy.md) and a newer one, so that neither a
# field that is too new nor one that was removed goes unnoticed.
KUBERNETES_VERSIONS = ("1.30", "1.33")
CORE_KINDS = {
    "Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
    "PersistentVolumeClaim", "Deployment", "CronJob",
}  # fmt: skip
SHIPPED = ("overlays/mi300x", "overlays/cuda")
RUNTIME_OVERLAYS = tuple(overlay for overlay in OVERLAYS if overlay not in PYTORCHJOB_OVERLAYS)
ACCELERATORS = {"overlays/mi300x": "amd.com/gpu", "overlays/cuda": "nvidia.com/gpu"}
TRAINING_IMAGES = {"overlays/mi300x": "train-rocm", "overlays/cuda": "train-cuda"}
# The PyTorchJob overlays by accelerator: the example, and the same for NVIDIA nodes (conftest).
PYTORCHJOB_ACCELERATORS = {
    "examples/training-operator-v1": "overlays/mi300x",
    "cuda": "overlays/cuda",
}
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|CREDENTIAL|(^|_)TOKEN$|STORE_URI$")
CREDENTIAL_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


@pytest.fixture(scope="module")
def pytorchjob_schema() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(shared_path("schemas", "kubeflow.org_pytorchjobs.yaml").read_text())
    (version,) = [entry for entry in crd["spec"]["versions"] if entry["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def admission_errors(job: dict) -> list[str]:
    """The checks the training operator's validating webhook makes on create (kubeflow/
    training-operator v1.9, pkg/webhooks/pytorch), beyond what its schema says."""
    errors = []
    name = job["metadata"]["name"]
    if len(name) > 63 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    replicas = job["spec"].get("pytorchReplicaSpecs") or {}
    if not replicas:
        errors.append("spec.pytorchReplicaSpecs is required")
    for replica_type, replica in replicas.items():
        if replica_type not in ("Master", "Worker"):
            errors.append(f"{replica_type}: only Master and Worker replicas exist")
        containers = replica.get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            errors.append(f"{replica_type}: no containers")
        if any(not container.get("image") for container in containers):
            errors.append(f"{replica_type}: a container without an image")
        if not any(container.get("name") == "pytorch" for container in containers):
            errors.append(f"{replica_type}: no container named pytorch")
        count = replica.get("replicas")
        if replica_type == "Master" and count != 1:
            errors.append("Master: replicas must be 1")
        if replica_type == "Worker" and isinstance(count, int) and count < 1:
            errors.append("Worker: replicas must be at least 1")
    return errors


def containers_of(document: dict) -> list[dict]:
    return [container for _, spec in pod_specs(document) for container in spec["containers"]]


def training_container(job: dict) -> dict:
    """The training container of a PyTorchJob's Master or a runtime's `node` job."""
    (where, spec), *_ = pod_specs(job)
    name = "node" if job["kind"] == "ClusterTrainingRuntime" else "pytorch"
    (container,) = [container for container in spec["containers"] if container["name"] == name]
    return container


@pytest.fixture
def with_pytorchjob(rendered, cuda_pytorchjob) -> dict[str, list[dict]]:
    """The overlays, and the v1-operator overlay for NVIDIA nodes as "cuda"."""
    return {**rendered, "cuda": cuda_pytorchjob}


def training_objects(documents: list[dict]) -> list[dict]:
    """The training job objects an overlay ships: its runtime, or the PyTorchJob template."""
    return [document for document in documents if document["kind"] in CUSTOM_KINDS]


def walk_strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_strings(item)
    elif isinstance(value, str):
        yield value


def test_the_base_renders_on_its_own(kustomize):
    kinds = {document["kind"] for document in render(kustomize, "base")}
    assert kinds == CORE_KINDS  # the training jobs' objects are the overlays'


def test_find_kustomize_explains_what_it_found_when_nothing_fits(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    command, reason = find_kustomize()
    assert command is None
    assert "no kubectl; no kustomize" in reason and "kustomize v5+" in reason


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_only_known_kinds_into_one_namespace(rendered, overlay):
    documents = rendered[overlay]
    job_kind = "PyTorchJob" if overlay in PYTORCHJOB_OVERLAYS else "ClusterTrainingRuntime"
    assert {document["kind"] for document in documents} == CORE_KINDS | {job_kind}
    assert only(documents, "Namespace")["metadata"]["name"] == NAMESPACE
    for document in documents:
        if document["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in document["metadata"], document["metadata"]["name"]
        else:
            assert document["metadata"]["namespace"] == NAMESPACE, document["metadata"]["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_the_kubernetes_schemas(rendered, overlay, version):
    for document in rendered[overlay]:
        if document["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(
                f"{document['kind']}/{document['metadata']['name']}: {where}: {error.message}"
            )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_standalone_kfp_objects_validate_too(standalone, version):
    # components/kfp-standalone patches the CronJob's environment and the launcher's RoleBinding.
    for document in standalone:
        if document["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("overlay", RUNTIME_OVERLAYS)
def test_the_runtime_validates_against_trainers_crd_and_rules(rendered, overlay):
    runtime = only(rendered[overlay], "ClusterTrainingRuntime")
    errors = schema_errors(trainer_validator("ClusterTrainingRuntime"), runtime)
    assert not errors, "\n".join(errors)
    assert not trainer_rule_errors(runtime)
    # The CRD leaves metadata to the API server: check it as the ObjectMeta it is.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": runtime["metadata"]}
    kubernetes_validate.validate(carrier, KUBERNETES_VERSIONS[0], strict=True)


def test_the_runtime_checks_would_catch_a_broken_runtime(rendered):
    runtime = only(rendered["overlays/mi300x"], "ClusterTrainingRuntime")
    broken = yaml.safe_load(yaml.safe_dump(runtime))
    broken["spec"]["mlPolicy"]["numProcPerNode"] = 8  # v2.3 moved it to the TrainJob
    broken["spec"]["mlPolicy"]["mpi"] = {}
    (job,) = broken["spec"]["template"]["spec"]["replicatedJobs"]
    job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    messages = schema_errors(trainer_validator("ClusterTrainingRuntime"), broken)
    assert messages == [
        "spec.mlPolicy: Additional properties are not allowed ('numProcPerNode' was unexpected)"
    ]
    assert trainer_rule_errors(broken) == [
        "spec.mlPolicy: only one policy, got ['torch', 'mpi']",
        "the node job has no container named node",
    ]


def test_standalone_kfp_stamps_its_namespace_on_the_runtime_which_the_api_server_drops(standalone):
    # kustomize cannot know the kind is cluster-scoped; the API server clears the namespace of a
    # cluster-scoped object on create. Everything else goes to KFP's namespace.
    runtime = only(standalone, "ClusterTrainingRuntime")
    assert not schema_errors(trainer_validator("ClusterTrainingRuntime"), runtime)


@pytest.mark.parametrize("overlay", PYTORCHJOB_ACCELERATORS)
def test_the_pytorchjob_validates_against_the_crd_and_the_operators_rules(
    with_pytorchjob, overlay, pytorchjob_schema
):
    job = only(with_pytorchjob[overlay], "PyTorchJob")
    errors = schema_errors(pytorchjob_schema, job)
    assert not errors, "\n".join(errors)
    assert not admission_errors(job)
    # The CRD leaves metadata to the API server: check it as the ObjectMeta it is.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": job["metadata"]}
    kubernetes_validate.validate(carrier, KUBERNETES_VERSIONS[0], strict=True)


def test_the_crd_checks_would_catch_a_broken_job(rendered, pytorchjob_schema):
    job = only(rendered["examples/training-operator-v1"], "PyTorchJob")
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["nprocPerNod"] = "8"  # a typo: strict field validation refuses it
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "one"
    del broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    messages = sorted(error.message for error in pytorchjob_schema.iter_errors(broken))
    assert messages == [
        "'name' is a required property",
        "'one' is not of type 'integer'",
        "Additional properties are not allowed ('nprocPerNod' was unexpected)",
    ]
    assert admission_errors(broken) == [
        "Master: no container named pytorch",
        "Master: replicas must be 1",
    ]


@pytest.mark.parametrize("overlay", [*SHIPPED, *PYTORCHJOB_ACCELERATORS])
def test_images_are_the_defaults_of_megasft_images(with_pytorchjob, overlay):
    documents = with_pytorchjob[overlay]
    training = TRAINING_IMAGES[PYTORCHJOB_ACCELERATORS.get(overlay, overlay)]
    expected = {
        "ClusterTrainingRuntime": image_for(training, {}).reference,
        "PyTorchJob": image_for(training, {}).reference,
        "CronJob": image_for("cpu", {}).reference,
        "Deployment": image_for("mlflow", {}).reference,
    }
    assert len(training_objects(documents)) == 1
    for kind, reference in expected.items():
        for document in objects_of(documents, kind):
            assert {container["image"] for container in containers_of(document)} == {reference}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_inlined_and_every_referenced_secret_is_documented(rendered, overlay):
    documents = rendered[overlay]
    assert not objects_of(documents, "Secret"), "Secrets are created by hand (docs/deploy.md)"
    deploy_guide = (REPO / "docs/deploy.md").read_text()
    for document in documents:
        for string in walk_strings(document):
            assert not CREDENTIAL_IN_URL.search(string), f"a credential in a URL: {string}"
        for container in containers_of(document):
            for variable in container.get("env", []):
                if CREDENTIAL_NAME.search(variable["name"]):
                    assert "valueFrom" in variable, f"{variable['name']} is set inline"
                secret = variable.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    create = rf"kubectl (-n \S+ )?create secret generic {secret['name']} "
                    assert re.search(create, deploy_guide), f"docs/deploy.md must show {create}"
                    assert f"--from-literal={secret['key']}=" in deploy_guide, secret["key"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_images_unprivileged_user(rendered, overlay):
    for document in rendered[overlay]:
        for where, spec in pod_specs(document):
            context = spec.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, f"{document['kind']} {where}"
            assert context.get("runAsUser") == IMAGE_UID, f"{document['kind']} {where}"
            for container in spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("overlay", PYTORCHJOB_OVERLAYS)
def test_the_pytorchjob_is_a_suspended_template_with_bounded_retries(rendered, overlay):
    spec = only(rendered[overlay], "PyTorchJob")["spec"]
    run_policy = spec["runPolicy"]
    assert run_policy["suspend"] is True  # applying the manifests must not start training
    assert run_policy["backoffLimit"] > 0 and run_policy["activeDeadlineSeconds"] > 0
    assert run_policy["cleanPodPolicy"] in ("Running", "All", "None")
    replicas = spec["pytorchReplicaSpecs"]
    # The CRD states these choices only in prose, so its schema does not check them.
    assert {name: replica["restartPolicy"] for name, replica in replicas.items()} == {
        "Master": "OnFailure",
        "Worker": "OnFailure",
    }
    assert replicas["Worker"]["template"] == replicas["Master"]["template"]


@pytest.mark.parametrize("overlay", RUNTIME_OVERLAYS)
def test_the_runtime_bounds_retries_and_time_and_leaves_the_shape_to_the_job(rendered, overlay):
    runtime = only(rendered[overlay], "ClusterTrainingRuntime")
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    job = node["template"]["spec"]
    assert job["backoffLimit"] > 0 and job["activeDeadlineSeconds"] > 0
    assert job["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert "parallelism" not in job and "completions" not in job  # Trainer sets them: numNodes


@pytest.mark.parametrize("overlay", PYTORCHJOB_OVERLAYS)
def test_the_training_command_matches_the_job_shape(rendered, overlay):
    from megasft.train.cli import add_train_arguments

    job = only(rendered[overlay], "PyTorchJob")
    container = training_container(job)
    assert container["command"] == ["torchrun"]
    assert container["args"][:2] == ["-m", "megasft.train.worker"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_train_arguments(parser)
    args = parser.parse_args(container["args"][2:])  # the worker's own flags
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert args.nproc == int(job["spec"]["nprocPerNode"])
    assert args.nodes == replicas["Master"]["replicas"] + replicas["Worker"]["replicas"]
    assert args.tracking_uri == "http://megasft-mlflow:5000"
    service = only(rendered[overlay], "Service")
    assert service["metadata"]["name"] == "megasft-mlflow"
    assert service["spec"]["ports"][0]["port"] == 5000


@pytest.mark.parametrize("overlay", RUNTIME_OVERLAYS)
def test_the_runtime_runs_the_worker_under_torchrun(rendered, overlay):
    # torchrun takes the shape from Trainer's PET_* variables; the launcher appends the flags.
    container = training_container(only(rendered[overlay], "ClusterTrainingRuntime"))
    assert container["command"] == ["torchrun"]
    assert container["args"] == ["-m", "megasft.train.worker"]


@pytest.mark.parametrize("overlay", [*SHIPPED, *PYTORCHJOB_ACCELERATORS])
def test_each_node_gets_all_its_gpus_of_the_right_kind(with_pytorchjob, overlay):
    (job,) = training_objects(with_pytorchjob[overlay])
    gpus = ACCELERATORS[PYTORCHJOB_ACCELERATORS.get(overlay, overlay)]
    other = ({*ACCELERATORS.values()} - {gpus}).pop()
    per_node = job["spec"].get("nprocPerNode", "8")  # a runtime's TrainJobs set their own
    for _, spec in pod_specs(job):
        resources = training_container(job)["resources"]
        assert resources["limits"][gpus] == resources["requests"][gpus] == per_node
        assert other not in yaml.safe_dump(spec)
        assert any(key.startswith(gpus.split("/")[0]) for key in spec["nodeSelector"])
        assert any(toleration["key"] == gpus for toleration in spec["tolerations"])


@pytest.mark.parametrize("overlay", RUNTIME_OVERLAYS)
def test_the_runtime_gives_shared_memory_and_leaves_the_claims_to_the_job(rendered, overlay):
    runtime = only(rendered[overlay], "ClusterTrainingRuntime")
    ((_, spec),) = pod_specs(runtime)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in training_container(runtime)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # The claims the step mounts come with each TrainJob (tests/launch/test_trainjob.py).
    assert not any("persistentVolumeClaim" in volume for volume in spec["volumes"])


@pytest.mark.parametrize("overlay", PYTORCHJOB_OVERLAYS)
def test_volumes_shared_memory_and_claims(rendered, overlay):
    documents = rendered[overlay]
    claims = {
        claim["metadata"]["name"]: claim for claim in objects_of(documents, "PersistentVolumeClaim")
    }
    job = only(documents, "PyTorchJob")
    for _, spec in pod_specs(job):
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {
            mount["mountPath"]: mount["name"] for mount in training_container(job)["volumeMounts"]
        }
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        for path in ("/data", "/checkpoints"):
            claim = volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]
            assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it


@pytest.mark.parametrize("overlay", [*SHIPPED, *PYTORCHJOB_ACCELERATORS])
def test_collective_settings_match_the_image_and_are_documented(with_pytorchjob, overlay):
    accelerator = PYTORCHJOB_ACCELERATORS.get(overlay, overlay)
    (job,) = training_objects(with_pytorchjob[overlay])
    environment = {
        variable["name"]: variable.get("value") for variable in training_container(job)["env"]
    }
    image_defaults = parse(REPO / IMAGES[TRAINING_IMAGES[accelerator]].dockerfile).parser.envs
    for name in environment.keys() & image_defaults.keys():
        assert environment[name] == image_defaults[name], name
    deploy_guide = (REPO / "docs/deploy.md").read_text()
    for name in environment:
        assert f"`{name}`" in deploy_guide, f"docs/deploy.md does not explain {name}"


def test_the_runtime_and_the_pytorchjob_template_set_the_same_collective_settings(
    with_pytorchjob,
):
    for accelerator, overlay in (
        ("overlays/mi300x", "examples/training-operator-v1"),
        ("overlays/cuda", "cuda"),
    ):
        runtime = only(with_pytorchjob[accelerator], "ClusterTrainingRuntime")
        job = only(with_pytorchjob[overlay], "PyTorchJob")
        assert training_container(runtime)["env"] == training_container(job)["env"], accelerator


def test_the_retraining_cronjob_ships_suspended_with_a_kfp_token(rendered):
    cronjob = only(rendered["overlays/mi300x"], "CronJob")
    # Suspended by decision: a weekly GPU run, which retrain.yml also schedules (manifests/base/
    # retrain.yaml); the cluster's overlay enables it.
    assert cronjob["spec"]["suspend"] is True
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    ((_, spec),) = pod_specs(cronjob)
    (container,) = spec["containers"]
    assert container["command"] == ["megasft", "pipeline", "submit"]
    (token,) = [volume for volume in spec["volumes"] if "projected" in volume]
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


def test_the_retraining_command_is_one_the_cli_accepts(rendered):
    cronjob = only(rendered["overlays/mi300x"], "CronJob")
    ((_, spec),) = pod_specs(cronjob)
    (container,) = spec["containers"]
    arguments = container_arguments(cronjob, container)[1:]  # after `megasft`
    subcommands = megasft_subcommands()
    assert arguments[0] in subcommands, f"megasft has no subcommand {arguments[0]!r}"
    try:
        parsed = subcommands[arguments[0]].parse_args(arguments[1:])
    except SystemExit:
        pytest.fail(f"megasft does not accept the CronJob's command: {' '.join(arguments)}")
    # The production configuration (one that exists), into its own experiment, in this profile.
    assert parsed.config == "qwen2.5-gsm8k"
    assert load_pipeline_config(parsed.config).launcher.kind == "trainjob"
    assert parsed.experiment == "megasft-retrain"
    assert parsed.namespace == NAMESPACE
    assert not parsed.wait  # the run is KFP's; the pod only submits it


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_pods_get_no_istio_sidecar(rendered, overlay):
    # A Kubeflow profile namespace injects one; it would keep a finished pod, and its job, running.
    (job,) = training_objects(rendered[overlay])
    cronjob = only(rendered[overlay], "CronJob")
    if job["kind"] == "PyTorchJob":
        templates = [replica["template"] for replica in job["spec"]["pytorchReplicaSpecs"].values()]
    else:
        templates = [
            replicated["template"]["spec"]["template"]
            for replicated in job["spec"]["template"]["spec"]["replicatedJobs"]
        ]
    templates.append(cronjob["spec"]["jobTemplate"]["spec"]["template"])
    for template in templates:
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_the_manifests_directory_holds_no_stray_yaml():
    # Everything under manifests/ is reachable from an overlay, so that nothing escapes validation.
    referenced = set()
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        content = yaml.safe_load(kustomization.read_text())
        for entry in content.get("resources", []) + [
            patch["path"] for patch in content.get("patches", []) if "path" in patch
        ]:
            referenced.add((kustomization.parent / entry).resolve())
    for path in MANIFESTS.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in referenced, (
                f"{path.relative_to(REPO)} is not in any kustomization"
            )


def test_the_deploy_guide_says_what_was_and_was_not_exercised():
    guide = (REPO / "docs/deploy.md").read_text()
    for heading in (
        "## Prerequisites",
        "## Step by step: from an empty namespace to a finished run",
        "## What was exercised here and what was not",
    ):
        assert f"\n{heading}\n" in guide
    for prerequisite in (
        "Kubeflow Pipelines",
        "Kubeflow Trainer",
        "training operator",
        "device plugin",
        "ReadWriteMany",
    ):
        assert prerequisite in guide
