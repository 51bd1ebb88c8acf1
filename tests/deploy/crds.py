"""The custom resources' schemas, as `kubectl apply` enforces them, and the rules their CRDs and
webhooks state outside the schema (CEL rules, admission checks), restated for offline checks.

The CRDs are ../shared/schemas: the training operator v1.9's PyTorchJob, Kubeflow Trainer
v2.3.0's TrainJob and training runtimes. A test that needs one skips where it is absent.
"""

from __future__ import annotations

import functools
import re

import jsonschema
import yaml

from tests.conftest import shared_path

TRAINER = "kubeflow-trainer-v2.3.0"
TRAINER_CRDS = {
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
    "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml",
}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# The containers whose environment a runtime patch may not set (the TrainJob CRD's own words).
ENV_SET_ELSEWHERE = {"node", "dataset-initializer", "model-initializer"}
ML_POLICIES = ("torch", "mpi", "jax", "xgboost", "flux")


def strict(schema: dict) -> dict:
    """The CRD schema as `kubectl apply` enforces it (strict field validation): an unknown field
    is an error wherever the schema does not keep unknown fields."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in schema:
            schema[combinator] = [strict(sub) for sub in schema[combinator]]
    return schema


@functools.cache
def trainer_validator(kind: str) -> jsonschema.Draft7Validator:
    """The strict schema of Trainer's `kind` (v1alpha1); skips the test without the CRDs."""
    text = shared_path("schemas", TRAINER, TRAINER_CRDS[kind]).read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # ~1 MB
    (version,) = [entry for entry in crd["spec"]["versions"] if entry["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(validator: jsonschema.Draft7Validator, document: dict) -> list[str]:
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def trainer_rule_errors(document: dict) -> list[str]:
    """The CEL rules of Trainer v2.3.0's CRDs that a new object can break (immutability rules
    cannot), and what its controller needs of a torch runtime: the `node` job and container."""
    errors = []
    spec = document.get("spec", {})
    if document["kind"] == "TrainJob":
        name = document["metadata"]["name"]
        if len(name) > 63 or not DNS_1035.fullmatch(name):
            errors.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63")
        managers = [patch["manager"] for patch in spec.get("runtimePatches") or []]
        if len(managers) != len(set(managers)):
            errors.append("spec.runtimePatches: one entry per manager")
        for patch in spec.get("runtimePatches") or []:
            template = patch.get("trainingRuntimeSpec", {}).get("template", {})
            for job in template.get("spec", {}).get("replicatedJobs") or []:
                pod = job.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
                for container in pod.get("containers") or []:
                    if container["name"] in ENV_SET_ELSEWHERE and "env" in container:
                        errors.append(f"runtimePatches: env of {container['name']} is forbidden")
        if spec.get("managedBy") not in (None, "trainer.kubeflow.org/trainjob-controller"):
            errors.append("spec.managedBy is another controller's")
        return errors
    policies = [policy for policy in ML_POLICIES if policy in spec.get("mlPolicy", {})]
    if len(policies) > 1:
        errors.append(f"spec.mlPolicy: only one policy, got {policies}")
    jobs = {
        job["name"]: job
        for job in spec.get("template", {}).get("spec", {}).get("replicatedJobs") or []
    }
    if "node" not in jobs:
        errors.append("no replicated job named node")
    else:
        containers = jobs["node"]["template"]["spec"]["template"]["spec"]["containers"]
        if "node" not in {container["name"] for container in containers}:
            errors.append("the node job has no container named node")
    return errors
