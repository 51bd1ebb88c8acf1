"""The `trainjob` launcher: one Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) per
training run.

The TrainJob names a training runtime (`spec.runtimeRef`: the overlay's ClusterTrainingRuntime,
which holds the image, the RCCL/NCCL settings, /dev/shm and the scheduling) and sets what is the
run's: torchrun and the run's flags, the nodes, processes and GPUs per node, and, as a runtime
patch, the claims the step mounts (plus node selector, tolerations and service account where
set). This module holds only what is TrainJob's (`TRAINJOB`, `build_trainjob`, finding the
node-0 pod); running, waiting, logs, retries and cancellation are `megasft.launch.job_run`'s.
docs/train.md ("Launchers") and docs/deploy.md ("Kubeflow Trainer v2") describe it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, ClassVar

from megasft.errors import ConfigError
from megasft.launch.cluster import ClusterLauncher
from megasft.launch.job_api import JobApi, JobKind, api_error
from megasft.launch.job_request import DNS_1123_LABEL, WORKER_MODULE, JobRequest
from megasft.launch.job_spec import (
    check_save_is_on_a_claim,
    check_template_kind,
    job_metadata,
    set_gpus,
    with_worker_args,
)
from megasft.launch.registry import register_launcher
from megasft.settings import setting

GROUP = "trainer.kubeflow.org"
CONTAINER = "node"  # Trainer's name for the training container, and for its replicated job
MANAGER = "megasft.launch"  # owns the launcher's entry of spec.runtimePatches
# The labels JobSet puts on the pods of a TrainJob (the JobSet has the TrainJob's name), and the
# index Kubernetes gives each pod of an Indexed Job (a label since 1.28, an annotation before).
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
# The runtimes of the overlays (manifests/overlays/*/runtime), by the GPUs they run on.
RUNTIMES = {"amd.com/gpu": "megasft-mi300x", "nvidia.com/gpu": "megasft-cuda"}
# Claim -> mount path: what the train step mounts (pipelines/sft_pipeline.py), at the same paths.
CLAIMS = {"megasft-data": "/data", "megasft-checkpoints": "/checkpoints"}
# Trainer replaces the runtime's resources with resourcesPerNode: CPU and memory go with the GPUs.
RESOURCES = {"requests": {"cpu": "32", "memory": "256Gi"}, "limits": {"memory": "512Gi"}}
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def _pods(api: JobApi, name: str) -> list[dict]:
    """The pods of the TrainJob's `node` replicated job, as plain dicts."""
    from kubernetes.client import ApiException

    try:
        response = api.core.list_namespaced_pod(
            api.namespace,
            label_selector=f"{JOBSET_NAME}={name},{REPLICATED_JOB}={CONTAINER}",
            _preload_content=False,
        )
    except ApiException as error:
        if error.status in (401, 403):
            doing = f"listing the pods of TrainJob {api.where}"
            raise api_error(error, doing, ("list", "pods")) from None
        raise
    return json.loads(response.data).get("items") or []


def _node_zero_pod(api: JobApi, name: str) -> str | None:
    # Node 0 runs rank 0: job 0 of the `node` replicated job, completion index 0. A restarted
    # node is a new pod: the newest one that is not being deleted.
    found = []
    for pod in _pods(api, name):
        metadata = pod.get("metadata") or {}
        labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
        index = labels.get(COMPLETION_INDEX, annotations.get(COMPLETION_INDEX))
        if labels.get(JOB_INDEX) == "0" and index == "0":
            alive = "deletionTimestamp" not in metadata
            found.append((alive, metadata.get("creationTimestamp", ""), metadata["name"]))
    return max(found)[2] if found else None


def _first_failed_pod(api: JobApi, name: str) -> str | None:
    # The first node whose training container failed: the others usually fail after it, when
    # their collectives lose it, and their logs say only that.
    failures = []
    for pod in _pods(api, name):
        status = pod.get("status") or {}
        times = [
            terminated.get("finishedAt") or ""
            for container in status.get("containerStatuses") or []
            if container.get("name") == CONTAINER
            for state in (container.get("state"), container.get("lastState"))
            if (terminated := (state or {}).get("terminated")) and terminated.get("exitCode")
        ]
        if not times and status.get("phase") == "Failed":
            times = ["~"]  # failed without a container's exit (evicted): after the others
        if times:
            failures.append((min(times), pod["metadata"]["name"]))
    return min(failures)[1] if failures else None


def _status_line(job: Mapping[str, Any]) -> str | None:
    """A TrainJob whose jobs could not be made, or the progress Trainer read from the trainer."""
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Created" and condition.get("status") == "False":
            return f"not started: {condition.get('reason', '')}: {condition.get('message', '')}"
    progress = status.get("trainerStatus") or {}
    parts = []
    if progress.get("progressPercentage") is not None:
        parts.append(f"{progress['progressPercentage']}%")
    if progress.get("estimatedRemainingSeconds") is not None:
        parts.append(f"about {_duration(progress['estimatedRemainingSeconds'])} left")
    parts += [f"{metric['name']} {metric['value']}" for metric in progress.get("metrics") or []]
    return f"progress: {', '.join(parts)}" if parts else None


def _duration(seconds: int) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _launcher_patch(job: Mapping[str, Any]) -> dict:
    """The pod spec of the launcher's runtime patch: its claims, mounts and scheduling."""
    for patch in job.get("spec", {}).get("runtimePatches") or []:
        if patch.get("manager") == MANAGER:
            template = patch.get("trainingRuntimeSpec", {}).get("template", {})
            for replicated in template.get("spec", {}).get("replicatedJobs") or []:
                if replicated.get("name") == CONTAINER:
                    return replicated["template"]["spec"]["template"]["spec"]
    return {}


def build_trainjob(template: Mapping[str, Any], request: JobRequest) -> dict:
    """The TrainJob that runs `request`: a copy of `template` with only these fields replaced.

    metadata (see `job_spec.job_metadata`); `status` removed; in spec.trainer the image (when
    the request names one; else the runtime's), the args after `megasft.train.worker` (the
    run's flags), numNodes, numProcPerNode and the GPU request and limit in resourcesPerNode.

    Args:
        template: the TrainJob to start from (`TrainJobLauncher.job_template()`).
        request: the run.

    Returns:
        The job to create.

    Raises:
        ConfigError: for a template that is not a trainer.kubeflow.org/v1alpha1 TrainJob naming
            a runtime and running megasft.train.worker, or a `--save` that is not on a writable
            claim of the launcher's runtime patch.
    """
    check_template_kind(template, TRAINJOB)
    job = copy.deepcopy(dict(template))
    job.pop("status", None)
    job["metadata"] = job_metadata(template, request)
    spec = job.setdefault("spec", {})
    if not (spec.get("runtimeRef") or {}).get("name"):
        raise ConfigError("the TrainJob names no training runtime (spec.runtimeRef.name)")
    trainer = spec.setdefault("trainer", {})
    if request.image:
        trainer["image"] = request.image
    trainer["args"] = with_worker_args("the TrainJob's trainer", trainer, request)
    trainer["numNodes"] = request.nodes
    trainer["numProcPerNode"] = request.gpus_per_node
    set_gpus("the TrainJob's resourcesPerNode", trainer.setdefault("resourcesPerNode", {}), request)
    pod = _launcher_patch(job)
    mounts = [c for c in pod.get("containers") or [] if c.get("name") == CONTAINER]
    check_save_is_on_a_claim({"spec": pod}, mounts[0] if mounts else {}, request.save_dir)
    return job


def _image(job: Mapping[str, Any]) -> str:
    reference = job["spec"]["runtimeRef"]
    return job["spec"]["trainer"].get("image") or f"{reference['name']}'s"


TRAINJOB = JobKind(
    group=GROUP,
    version="v1alpha1",
    plural="trainjobs",
    kind="TrainJob",
    operator="Kubeflow Trainer v2 (and its JobSet controller)",
    container=CONTAINER,
    primary="first node",
    primary_pod=_node_zero_pod,
    build=build_trainjob,
    image_of=_image,
    succeeded="Complete",
    failed="Failed",
    failed_pod=_first_failed_pod,
    status_line=_status_line,
)


@register_launcher
@dataclass(frozen=True)
class TrainJobLauncher(ClusterLauncher):
    """`launcher.kind: trainjob`: training as a Kubeflow Trainer v2 TrainJob on a runtime."""

    kind: ClassVar[str] = "trainjob"
    job_kind: ClassVar[JobKind] = TRAINJOB

    runtime: str | None = setting(
        None, "The training runtime; None: the overlay's for `gpu_resource` (RUNTIMES)."
    )
    runtime_kind: str | None = setting(
        None, "`TrainingRuntime` for one in the job's namespace; None: `ClusterTrainingRuntime`."
    )
    claims: Mapping[str, str] | None = setting(
        None,
        "PersistentVolumeClaim -> mount path on the training pods; None: the step's (CLAIMS). "
        "All are mounted read-only but the one holding `workspace`.",
    )
    node_selector: Mapping[str, str] | None = setting(
        None,
        "Patched onto the runtime's node selector (Trainer merges it); None: the runtime's alone.",
    )
    tolerations: Sequence[Mapping[str, Any]] | None = setting(
        None, "The training pods' tolerations; None: the runtime's."
    )
    service_account: str | None = setting(
        None, "The training pods' ServiceAccount; None: the runtime's (the namespace's default)."
    )
    env: Mapping[str, str] | None = setting(
        None, "Environment of the training container, beside the runtime's (e.g. NCCL_DEBUG: INFO)."
    )
    resources_per_node: Mapping[str, Mapping[str, str]] | None = setting(
        None,
        "CPU and memory `requests` and `limits` per node (the GPUs are added); None: RESOURCES.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.template is not None:
            raise ConfigError(
                "launcher.template is the PyTorchJob template; a TrainJob is built from "
                "launcher.runtime and the other launcher settings: leave template out"
            )
        if self.runtime is None and self.gpu_resource not in RUNTIMES:
            raise ConfigError(
                f"launcher.runtime: no runtime of ours runs on {self.gpu_resource}; name yours"
            )
        for name in ("runtime", "service_account"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _is_name(value)):
                raise ConfigError(f"launcher.{name} {value!r} is not a valid object name")
        if self.runtime_kind is not None and self.runtime_kind not in RUNTIME_KINDS:
            raise ConfigError(
                f"launcher.runtime_kind {self.runtime_kind!r}: use {' or '.join(RUNTIME_KINDS)}"
            )
        self._check_claims()
        _check_strings("node_selector", self.node_selector, bool)
        _check_strings("env", self.env, ENV_NAME.fullmatch)
        object.__setattr__(self, "tolerations", _whole_numbers(self.tolerations))
        for toleration in self.tolerations or ():
            if not isinstance(toleration, Mapping) or set(toleration) - TOLERATION_KEYS:
                raise ConfigError(
                    f"launcher.tolerations: {toleration!r} is not a toleration (keys: "
                    f"{', '.join(sorted(TOLERATION_KEYS))})"
                )
        self._check_resources()

    def _check_claims(self) -> None:
        claims = CLAIMS if self.claims is None else self.claims
        if not isinstance(claims, Mapping) or not claims:
            raise ConfigError("launcher.claims: give claim names and their mount paths")
        for claim, path in claims.items():
            if not (
                isinstance(claim, str) and DNS_1123_LABEL.fullmatch(claim) and len(claim) <= 63
            ):
                raise ConfigError(f"launcher.claims: {claim!r} is not a claim name of ours")
            if not (isinstance(path, str) and PurePosixPath(path).is_absolute()):
                raise ConfigError(f"launcher.claims.{claim}: {path!r} is not an absolute path")
        if self._writable_claim(claims) is None:
            raise ConfigError(
                f"launcher.workspace {self.workspace} is on none of the claims "
                f"({', '.join(f'{c} at {p}' for c, p in claims.items())}): the training pods "
                "write their checkpoints there, so it must be on a claim they mount"
            )

    def _writable_claim(self, claims: Mapping[str, str]) -> str | None:
        inside = [c for c, p in claims.items() if PurePosixPath(self.workspace).is_relative_to(p)]
        return max(inside, key=lambda claim: len(claims[claim]), default=None)

    def _check_resources(self) -> None:
        resources = RESOURCES if self.resources_per_node is None else self.resources_per_node
        if not isinstance(resources, Mapping) or set(resources) - {"requests", "limits"}:
            raise ConfigError("launcher.resources_per_node: give `requests` and/or `limits`")
        plain = {}
        for kind, amounts in resources.items():
            if not isinstance(amounts, Mapping):
                raise ConfigError(f"launcher.resources_per_node.{kind}: expected resource: amount")
            if self.gpu_resource in amounts:
                raise ConfigError(
                    f"launcher.resources_per_node.{kind}: leave {self.gpu_resource} out; it is "
                    "launcher.gpus_per_node"
                )
            plain[kind] = {name: _quantity(amount) for name, amount in amounts.items()}
        object.__setattr__(self, "resources_per_node", None if resources is RESOURCES else plain)

    def job_template(self) -> dict:
        """The TrainJob this launcher's settings make, before the run's fields are set."""
        claims = CLAIMS if self.claims is None else self.claims
        writable = self._writable_claim(claims)
        read_only = {claim: claim != writable for claim in claims}
        pod: dict[str, Any] = {
            "volumes": [
                {
                    "name": claim,
                    "persistentVolumeClaim": {"claimName": claim}
                    | ({"readOnly": True} if read_only[claim] else {}),
                }
                for claim in claims
            ],
            "containers": [
                {
                    "name": CONTAINER,
                    "volumeMounts": [
                        {"name": claim, "mountPath": path}
                        | ({"readOnly": True} if read_only[claim] else {})
                        for claim, path in claims.items()
                    ],
                }
            ],
        }
        if self.node_selector:
            pod["nodeSelector"] = dict(self.node_selector)
        if self.tolerations is not None:
            pod["tolerations"] = [dict(toleration) for toleration in self.tolerations]
        if self.service_account:
            pod["serviceAccountName"] = self.service_account
        trainer: dict[str, Any] = {"command": ["torchrun"], "args": ["-m", WORKER_MODULE]}
        if self.env:
            trainer["env"] = [{"name": name, "value": value} for name, value in self.env.items()]
        trainer["resourcesPerNode"] = copy.deepcopy(dict(self.resources_per_node or RESOURCES))
        node_job = {"name": CONTAINER, "template": {"spec": {"template": {"spec": pod}}}}
        return {
            "apiVersion": TRAINJOB.api_version,
            "kind": TRAINJOB.kind,
            "metadata": {
                "labels": {
                    "app.kubernetes.io/name": "megasft-train",
                    "app.kubernetes.io/component": "training",
                    "app.kubernetes.io/part-of": "megasft",
                }
            },
            "spec": {
                "runtimeRef": {
                    "apiGroup": GROUP,
                    "kind": self.runtime_kind or RUNTIME_KINDS[0],
                    "name": self.runtime or RUNTIMES[self.gpu_resource],
                },
                "trainer": trainer,
                "runtimePatches": [
                    {
                        "manager": MANAGER,
                        "trainingRuntimeSpec": {
                            "template": {"spec": {"replicatedJobs": [node_job]}}
                        },
                    }
                ],
            },
        }


def _is_name(value: str) -> bool:
    """A DNS-1123 subdomain: what most object names must be."""
    return len(value) <= 253 and all(DNS_1123_LABEL.fullmatch(part) for part in value.split("."))


def _check_strings(setting: str, values: Any, valid_key: Any) -> None:
    if values is None:
        return
    if not isinstance(values, Mapping) or not all(
        isinstance(key, str) and valid_key(key) and isinstance(value, str)
        for key, value in values.items()
    ):
        raise ConfigError(f"launcher.{setting}: expected names with string values, got {values!r}")


def _whole_numbers(value: Any) -> Any:
    """Whole-number floats (as KFP passes every number of a dict parameter) as integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_whole_numbers(item) for item in value]
    return value


def _quantity(amount: Any) -> str:
    amount = _whole_numbers(amount)
    if isinstance(amount, bool) or not isinstance(amount, int | float | str) or amount == "":
        raise ConfigError(f"launcher.resources_per_node: {amount!r} is not a quantity")
    return str(amount)
