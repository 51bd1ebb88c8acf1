"""Rendering the manifests with kustomize, and finding things in what it renders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import REPO

MANIFESTS = REPO / "manifests"
# What a cluster applies: the shipped overlays (Kubeflow Trainer v2), the example of a cluster's own
# overlay, and the example for a cluster that runs the v1 training operator (PyTorchJob).
OVERLAYS = (
    "overlays/mi300x",
    "overlays/cuda",
    "examples/my-cluster",
    "examples/training-operator-v1",
)
# The overlays with the PyTorchJob template (components/pytorchjob); the others ship a runtime.
PYTORCHJOB_OVERLAYS = ("examples/training-operator-v1",)
# Objects kustomize cannot tell are cluster-scoped (no namespace on the cluster), and custom kinds,
# which the Kubernetes OpenAPI schemas do not know (their CRDs' schemas check them).
CLUSTER_SCOPED = {"Namespace", "ClusterTrainingRuntime"}
CUSTOM_KINDS = {"PyTorchJob", "ClusterTrainingRuntime"}
# `replacements`, components and JSON patches with targets need kustomize v5 (kubectl >= 1.27).
KUSTOMIZE_MAJOR = 5
NAMESPACE = "megasft"
# Standalone Kubeflow Pipelines: the MI300X overlay moved into KFP's namespace with the kfp-standalone
# component, as docs/deploy.md (step 1) tells a cluster's own overlay to do.
STANDALONE_NAMESPACE = "kubeflow"
STANDALONE_COMPONENTS = ("components/kfp-standalone",)
# The uid and gid of the `megasft` user in every image (docker/Dockerfile.*), which the pods run as.
IMAGE_UID = 10001


def _major(version: str) -> int:
    digits = version.lstrip("v").split(".")[0]
    return int(digits) if digits.isdigit() else 0


def find_kustomize() -> tuple[list[str] | None, str]:
    """`kubectl kustomize` or `kustomize build`, whichever is v5 or newer; else None and why."""
    findings = []
    kubectl = shutil.which("kubectl")
    if kubectl:
        result = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True
        )
        version = json.loads(result.stdout or "{}").get("kustomizeVersion", "")
        if _major(version) >= KUSTOMIZE_MAJOR:
            return [kubectl, "kustomize"], f"kubectl with kustomize {version}"
        findings.append(f"kubectl embeds kustomize {version or 'of unknown version'}")
    else:
        findings.append("no kubectl")
    standalone = shutil.which("kustomize")
    if standalone:
        result = subprocess.run([standalone, "version"], capture_output=True, text=True)
        version = result.stdout.strip().split()[-1] if result.stdout.strip() else ""
        if _major(version) >= KUSTOMIZE_MAJOR:
            return [standalone, "build"], f"kustomize {version}"
        findings.append(f"kustomize {version or 'of unknown version'}")
    else:
        findings.append("no kustomize")
    return None, (
        f"rendering the manifests needs kustomize v{KUSTOMIZE_MAJOR}+ ({'; '.join(findings)}): "
        "install kubectl >= 1.27 from Kubernetes' own packages (pkgs.k8s.io) or a kustomize "
        "release binary; Debian 12's kubernetes-client (1.20) is too old"
    )


def render(command: list[str], directory: str) -> list[dict]:
    result = subprocess.run(
        [*command, str(MANIFESTS / directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kustomize failed on manifests/{directory}:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def render_standalone(command: list[str], directory: Path) -> list[dict]:
    """A standalone-KFP overlay written into `directory` (outside the repository), rendered."""
    return render_composed(
        command,
        directory,
        ["overlays/mi300x"],
        list(STANDALONE_COMPONENTS),
        namespace=STANDALONE_NAMESPACE,
    )


def render_composed(
    command: list[str],
    directory: Path,
    resources: list[str],
    components: list[str],
    namespace: str | None = None,
) -> list[dict]:
    """An overlay of `resources` and `components` (paths under manifests/) written into
    `directory` (outside the repository), as a cluster's own overlay would be; rendered."""

    def relative(path: str) -> str:
        return os.path.relpath(MANIFESTS / path, directory)

    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        **({"namespace": namespace} if namespace else {}),
        "resources": [relative(resource) for resource in resources],
        "components": [relative(component) for component in components],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize failed on {kustomization}:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def objects_of(documents: list[dict], kind: str) -> list[dict]:
    return [document for document in documents if document["kind"] == kind]


def only(documents: list[dict], kind: str) -> dict:
    found = objects_of(documents, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_specs(document: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template in a workload object."""
    kind, spec = document["kind"], document.get("spec", {})
    if kind == "Deployment":
        return [("template", spec["template"]["spec"])]
    if kind == "CronJob":
        return [("jobTemplate", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "PyTorchJob":
        return [
            (replica, replica_spec["template"]["spec"])
            for replica, replica_spec in spec["pytorchReplicaSpecs"].items()
        ]
    if kind == "ClusterTrainingRuntime":
        return [
            (replicated["name"], replicated["template"]["spec"]["template"]["spec"])
            for replicated in spec["template"]["spec"]["replicatedJobs"]
        ]
    return []


def container_arguments(document: dict, container: dict) -> list[str]:
    """The container's command and args as the kubelet runs them: `$(NAME)` expanded from its env
    (a value, or a downward-API fieldRef to metadata.namespace)."""
    environment = {}
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        else:
            field_path = variable["valueFrom"]["fieldRef"]["fieldPath"]
            assert field_path == "metadata.namespace", f"{variable['name']}: {field_path}"
            environment[variable["name"]] = document["metadata"]["namespace"]
    return [
        re.sub(r"\$\((\w+)\)", lambda match: environment[match.group(1)], argument)
        for argument in container.get("command", []) + container.get("args", [])
    ]
