"""Cluster launches: one Kubeflow PyTorchJob (kubeflow.org/v1) per training run.

The cluster's manifests hold a suspended template PyTorchJob
(manifests/base/pytorchjob-template.yaml, plus an overlay for the accelerator). `run_pytorchjob`
copies it, overwrites only the fields the template's header lists (`build_pytorchjob`), creates
the copy with the Kubernetes Python client, follows the master's log into the step's log, and
returns when the job has succeeded, or raises `PyTorchJobError` when it failed, timed out or was
cancelled.

Decisions, and why:

- **The Kubernetes API, nothing more than the launcher's Role.** The launcher `create`s, `get`s and
  `delete`s pytorchjobs and `get`s pods/log (manifests/base/launcher-rbac.yaml). It does not list
  pods: the training operator names them `<job>-master-0` and `<job>-worker-N`. It polls the job
  with `get` every `poll_s` instead of a watch: a poll survives API-server restarts and dropped
  connections without the bookkeeping a watch needs (resource versions, 410 Gone), and one small GET
  every few seconds is nothing next to a training run.
- **Job names are deterministic.** `job_name(run_id, task)` hashes a pipeline run's id and the
  task's name into a DNS-1035 label, so a retried step finds the job of its previous attempt:
  a running job is adopted (followed, not created again); a succeeded one is reported as success
  without training again; a failed one is deleted (foreground, so that its pods, whose names the new
  job reuses, are gone first) and created again. The new job resumes from the newest checkpoint
  under `--save`, which must therefore be on a PersistentVolumeClaim mounted writable by the
  template (checked by `build_pytorchjob`) and the same for every attempt (a path that contains the
  job's name is).
- **Owner reference.** The launching pod (POD_NAME/POD_UID from the downward API, or the
  KFP_POD_NAME/KFP_POD_UID that Kubeflow Pipelines sets on every step) owns the job, so that
  deleting the pipeline run's pods garbage-collects the job even when the launcher had no chance to
  delete it. `blockOwnerDeletion` is left unset: setting it needs `update` on pods/finalizers,
  which the launcher's Role does not grant. An adopted job keeps the owner of the attempt that
  created it (changing owners would need `patch`); if that pod is deleted while a later attempt
  follows the job, the job is garbage-collected and the launcher reports it as deleted.
- **What deletes a job.** A timeout, SIGTERM (Kubeflow Pipelines stopping the run) and
  KeyboardInterrupt delete the job (propagationPolicy Foreground) and raise. A failed job is kept
  for inspection (its pods' logs stay until `ttlSecondsAfterFinished`); the next attempt deletes it.
  An error of the API itself (the API server unreachable for longer than a few polls) leaves the job
  running, so that a retried step adopts it rather than losing the progress since the last
  checkpoint.
- **Logs.** A thread follows the master's `pytorch` container log (`follow=true`, with timestamps),
  writes each line to `log` and keeps the last ones for error messages. When the stream ends
  (the container restarted, the pod is not there yet, the connection dropped) it reconnects every
  `poll_s`, asking only for the lines since the last one it saw (plus a margin for clock skew), and
  skips lines it has already written by their timestamps. After the job ends it reads once more, so
  that the last lines are written before `run_pytorchjob` returns.
- **Timeout.** `PyTorchJobRequest.timeout_s` counts from the call, for an adopted job as well; the
  template's `runPolicy.activeDeadlineSeconds` is the cluster's own limit on top of it.

`kubernetes` is imported inside the functions that talk to the cluster, so importing this module
(and `megasft --help`) stays fast.
"""

from __future__ import annotations

import argparse
import calendar
import copy
import functools
import hashlib
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import yaml

from megasft.errors import ConfigError
from megasft.launch.local import LaunchError

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
TEMPLATE_NAME = "megasft-train-template"
TEMPLATE_LABEL = "megasft/template"
CONTAINER = "pytorch"  # the training operator requires this container name
WORKER_MODULE = "megasft.train.worker"
# The operator names a Service and a pod `<job>-worker-<index>`; a Service name is a DNS-1035 label
# of at most 63 characters, which leaves 63 - len("-worker-") - 4 index digits for the job.
MAX_NAME_LENGTH = 51
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
GPU_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")
# Where each accelerator's training image comes from when the template names no usable image.
TRAINING_IMAGE_FAMILIES = {"amd.com/gpu": "train-rocm", "nvidia.com/gpu": "train-cuda"}
# The downward-API variables that name the launching pod: ours first, then Kubeflow Pipelines'.
OWNER_VARIABLES = (("POD_NAME", "POD_UID"), ("KFP_POD_NAME", "KFP_POD_UID"))
NAMESPACE_VARIABLES = ("POD_NAMESPACE", "KFP_NAMESPACE")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "megasft"  # the manifests' namespace (manifests/base/kustomization.yaml)
TAIL_LINES = 30
LOG_CONNECT_TIMEOUT_S = 30.0
# A follow stream without a line for this long is reopened: it catches half-open connections.
LOG_READ_TIMEOUT_S = 300.0
LOG_SKEW_MARGIN_S = 60  # reconnecting asks for this much more log than strictly needed
LOG_DRAIN_S = 15.0  # how long a finished job's last lines may take to arrive
API_ERROR_LIMIT = 6  # consecutive failed polls (server errors, lost connections) before giving up
DELETE_WAIT_S = 600.0  # a failed job's foreground deletion (its pods) before it is created again
TERMINAL = ("Succeeded", "Failed")


class PyTorchJobError(LaunchError):
    """A PyTorchJob failed, timed out, was cancelled or deleted, or could not be created.

    `reason` is one of "failed", "timeout", "cancelled", "deleted", "api".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Terminated(BaseException):
    """SIGTERM arrived; a BaseException so that no `except Exception` on the way swallows it."""


class _DeadlinePassed(Exception):
    """`timeout_s` has passed (not TimeoutError, which a socket's own timeout also raises)."""


def job_name(*parts: str, prefix: str = "megasft-train") -> str:
    """A job name that is the same for the same `parts`: the pipeline run's id and the task's name.

    `prefix-` and 12 hex digits of the SHA-256 of the parts: a DNS-1035 label that a retried step
    computes again, so that it finds the job of its previous attempt.
    """
    if not parts or not all(parts):
        raise ConfigError("job_name needs non-empty parts, e.g. the pipeline run's id and the task")
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    name = f"{prefix}-{digest}"
    if len(name) > MAX_NAME_LENGTH or not DNS_1035_LABEL.fullmatch(name):
        raise ConfigError(
            f"job name prefix {prefix!r} gives {name!r}, not a DNS-1035 label of at most "
            f"{MAX_NAME_LENGTH} characters; use lower-case letters, digits and '-'"
        )
    return name


def _owner_from_environment() -> tuple[str, str] | tuple[None, None]:
    for name_variable, uid_variable in OWNER_VARIABLES:
        name, uid = os.environ.get(name_variable), os.environ.get(uid_variable)
        if name and uid:
            return name, uid
    return None, None


def _default_owner_name() -> str | None:
    return _owner_from_environment()[0]


def _default_owner_uid() -> str | None:
    return _owner_from_environment()[1]


def default_namespace() -> str:
    """POD_NAMESPACE or KFP_NAMESPACE, else the pod's service-account namespace, else `megasft`."""
    for variable in NAMESPACE_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


@functools.cache
def _train_parser() -> argparse.ArgumentParser:
    from megasft.train.cli import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="python -m megasft.train.worker", allow_abbrev=False, exit_on_error=False
    )
    add_train_arguments(parser)
    return parser


@dataclass(frozen=True)
class PyTorchJobRequest:
    """One training run on the cluster: what `build_pytorchjob` changes in the template."""

    name: str
    """The job's name: a DNS-1035 label of at most 51 characters. `job_name(run_id, task)` gives one
    that a retried step computes again, so that it finds the job of its previous attempt."""
    train_args: Sequence[str]
    """The flags of `megasft train` that every node's `python -m megasft.train.worker` gets, e.g.
    ("--data=/data/sft", "--load=/checkpoints/base-mcore", "--save=/checkpoints/runs/NAME",
    "--train-iters=1000"). `--save` is required and must lie on a PersistentVolumeClaim that the
    template mounts writable, the same directory for every attempt: a job created again after a
    failure resumes from the newest checkpoint there. `--nproc` and `--nodes` are added from
    `gpus_per_node` and `nodes`; given here, they must agree with them."""
    namespace: str = field(default_factory=default_namespace)
    """Where the template is and the job runs; default: see `default_namespace`."""
    nodes: int = 1
    """Nodes (pods): one Master and nodes - 1 Workers."""
    gpus_per_node: int = 8
    """GPUs (and training processes) per node: `nprocPerNode`, each pod's GPU request and limit."""
    gpu_resource: str = "amd.com/gpu"
    """The device plugin's resource name: `amd.com/gpu` (MI300X) or `nvidia.com/gpu`."""
    image: str | None = None
    """The training image; None keeps the template's, which the cluster's overlay set (a template
    that still has kustomize's placeholder gets `megasft.images.image_for` of the accelerator)."""
    owner_name: str | None = field(default_factory=_default_owner_name)
    """The launching pod, the job's owner; default: POD_NAME, else KFP_POD_NAME; None: no owner."""
    owner_uid: str | None = field(default_factory=_default_owner_uid)
    """That pod's uid; default: POD_UID, else KFP_POD_UID."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Added to the job's labels (the template's, less `megasft/template`), e.g. the run's id."""
    timeout_s: float | None = None
    """Seconds from the call until the job is deleted and PyTorchJobError raised; None: no limit."""
    template_name: str = TEMPLATE_NAME
    """The suspended template PyTorchJob in `namespace`, read when no template is passed."""

    def __post_init__(self) -> None:
        if len(self.name) > MAX_NAME_LENGTH or not DNS_1035_LABEL.fullmatch(self.name):
            raise ConfigError(
                f"job name {self.name!r} is not a DNS-1035 label of at most {MAX_NAME_LENGTH} "
                "characters (lower-case letters, digits and '-', starting with a letter); "
                "megasft.launch.pytorchjob.job_name(run_id, task) makes one"
            )
        if not DNS_1123_LABEL.fullmatch(self.namespace) or len(self.namespace) > 63:
            raise ConfigError(f"namespace {self.namespace!r} is not a valid namespace name")
        for setting in ("nodes", "gpus_per_node"):
            if getattr(self, setting) < 1:
                raise ConfigError(f"{setting} must be at least 1, got {getattr(self, setting)}")
        if not GPU_RESOURCE.fullmatch(self.gpu_resource):
            raise ConfigError(
                f"gpu_resource {self.gpu_resource!r} is not an extended resource name such as "
                "amd.com/gpu or nvidia.com/gpu"
            )
        if (self.owner_name is None) != (self.owner_uid is None):
            raise ConfigError(
                "owner_name and owner_uid go together: set both (the launching pod's name and uid, "
                "e.g. from the downward API as POD_NAME and POD_UID) or neither"
            )
        owner_namespace = next(
            (os.environ[variable] for variable in NAMESPACE_VARIABLES if os.environ.get(variable)),
            None,
        )
        if self.owner_name is not None and owner_namespace not in (None, self.namespace):
            # Kubernetes takes an owner in another namespace for a missing one and deletes the
            # job at once; refuse rather than watch the job vanish.
            raise ConfigError(
                f"the job would run in namespace {self.namespace} but its owner, the launching pod "
                f"{self.owner_name}, is in {owner_namespace}: an owner reference cannot cross "
                "namespaces; run the job in the pod's namespace (leave launcher.namespace unset)"
            )
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        for key, value in self.labels.items():
            prefix, _, label = key.rpartition("/")
            if not (0 < len(label) <= 63 and LABEL_NAME.fullmatch(label)) or (
                prefix and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", prefix)
            ):
                raise ConfigError(f"label key {key!r} is not a valid Kubernetes label key")
            if len(value) > 63 or not LABEL_NAME.fullmatch(value):
                raise ConfigError(
                    f"label {key}={value!r}: a value is at most 63 letters, digits, '-', '_' "
                    "and '.', beginning and ending with a letter or digit"
                )
        object.__setattr__(self, "train_args", tuple(self.train_args))
        object.__setattr__(self, "labels", dict(self.labels))
        self._parsed_train_args()  # refuses unknown flags and a missing --save now, not in the pod

    def _parsed_train_args(self) -> argparse.Namespace:
        try:
            parsed, unknown = _train_parser().parse_known_args(list(self.train_args))
        except (argparse.ArgumentError, SystemExit) as error:
            raise ConfigError(f"train_args {list(self.train_args)}: {error}") from None
        if unknown:
            raise ConfigError(
                f"train_args: {' '.join(unknown)} is not a flag of `megasft train` "
                "(see `megasft train --help`)"
            )
        if not parsed.save:
            raise ConfigError(
                "train_args needs --save=DIR on the checkpoint volume (e.g. "
                "--save=/checkpoints/runs/JOB_NAME): a retried job resumes from the newest "
                "checkpoint there"
            )
        for flag, wanted, source in (
            ("--nproc", self.gpus_per_node, "gpus_per_node"),
            ("--nodes", self.nodes, "nodes"),
        ):
            given = getattr(parsed, flag[2:])
            if given is not None and given != wanted:
                raise ConfigError(
                    f"train_args has {flag}={given} but the request's {source} is {wanted}; "
                    f"leave {flag} out (it is set from {source})"
                )
        return parsed

    @property
    def save_dir(self) -> str:
        """The `--save` directory of the run, where its checkpoints are."""
        return self._parsed_train_args().save

    @property
    def worker_args(self) -> list[str]:
        """`train_args` with --nproc and --nodes added where they are missing."""
        parsed = self._parsed_train_args()
        extra = []
        if parsed.nproc is None:
            extra.append(f"--nproc={self.gpus_per_node}")
        if parsed.nodes is None:
            extra.append(f"--nodes={self.nodes}")
        return [*self.train_args, *extra]


@dataclass(frozen=True)
class PyTorchJobResult:
    """A PyTorchJob that succeeded."""

    name: str
    namespace: str
    origin: str
    """How this call came to it: "created", "adopted" (an earlier attempt's job, still running),
    "recreated" (an earlier attempt's job had failed; deleted and created again, resuming from the
    newest checkpoint) or "already-succeeded" (an earlier attempt's job had finished)."""
    log_tail: tuple[str, ...]
    """The last lines of the master's log."""
    seconds: float
    """From the call until the job's success was seen."""


# --- the template and the job ----------------------------------------------------------------


def load_template(path: str | Path) -> dict:
    """The PyTorchJob in a YAML file: a rendered overlay (`kubectl kustomize manifests/overlays/
    mi300x`, one of many documents) or manifests/base/pytorchjob-template.yaml itself."""
    path = Path(path)
    try:
        documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the PyTorchJob template {path}: {error}") from error
    jobs = [document for document in documents if document.get("kind") == KIND]
    if len(jobs) != 1:
        raise ConfigError(f"{path} holds {len(jobs)} PyTorchJobs; a template needs exactly one")
    return jobs[0]


def read_template(api_client: Any, namespace: str, name: str = TEMPLATE_NAME) -> dict:
    """The template PyTorchJob `name` in `namespace`, read from the cluster with `get`."""
    from kubernetes import client

    api = client.CustomObjectsApi(api_client)
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as error:
        if error.status == 404:
            raise PyTorchJobError(
                f"no PyTorchJob template {namespace}/{name}: apply the manifests first "
                "(kubectl apply -k manifests/overlays/mi300x, docs/deploy.md), or, if the "
                "PyTorchJob resource itself is unknown, install the Kubeflow training operator",
                "api",
            ) from None
        raise _api_error(error, f"reading the template {namespace}/{name}") from None


def build_pytorchjob(template: Mapping[str, Any], request: PyTorchJobRequest) -> dict:
    """The PyTorchJob that runs `request`: a copy of `template` with only these fields replaced.

    metadata: a new one with the name, the namespace, the template's labels (less
    `megasft/template`) plus the request's, and the owner pod (annotations, uid, resourceVersion
    and the other server fields of the template are left behind); `status` removed;
    spec.runPolicy.suspend false; spec.nprocPerNode; Worker replicas (nodes - 1; no Worker for one
    node); and in the `pytorch` container of each replica: the image, the args (the template's
    up to `megasft.train.worker`, then the request's flags) and the GPU request and limit.
    Everything else is the cluster's: volumes, environment, scheduling, security, run policy.

    A template whose Worker has an empty pod template (manifests/base/pytorchjob-template.yaml
    before kustomize copies the Master's into it) gets the Master's.
    """
    if template.get("apiVersion") != f"{GROUP}/{VERSION}" or template.get("kind") != KIND:
        raise ConfigError(
            f"the template is a {template.get('apiVersion')} {template.get('kind')}, "
            f"not a {GROUP}/{VERSION} {KIND}"
        )
    job = copy.deepcopy(dict(template))
    job.pop("status", None)
    labels = {
        key: value
        for key, value in (template.get("metadata", {}).get("labels") or {}).items()
        if key != TEMPLATE_LABEL
    }
    metadata: dict[str, Any] = {
        "name": request.name,
        "namespace": request.namespace,
        "labels": {**labels, **request.labels},
    }
    if request.owner_name is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": request.owner_name,
                "uid": request.owner_uid,
            }
        ]
    job["metadata"] = metadata

    spec = job.setdefault("spec", {})
    spec.setdefault("runPolicy", {})["suspend"] = False
    spec["nprocPerNode"] = str(request.gpus_per_node)
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "Master" not in replicas:
        raise ConfigError("the template has no Master in spec.pytorchReplicaSpecs")
    master = replicas["Master"]
    master["replicas"] = 1
    if request.nodes == 1:
        replicas.pop("Worker", None)
    else:
        worker = replicas.setdefault("Worker", {"restartPolicy": master.get("restartPolicy")})
        if not worker.get("template"):
            worker["template"] = copy.deepcopy(master["template"])
        worker["replicas"] = request.nodes - 1
    for replica_type, replica in replicas.items():
        _set_container(replica_type, replica, request)
    _check_save_is_on_a_claim(master, request.save_dir)
    return job


def _training_container(replica_type: str, replica: Mapping[str, Any]) -> dict:
    containers = (replica.get("template") or {}).get("spec", {}).get("containers") or []
    found = [container for container in containers if container.get("name") == CONTAINER]
    if len(found) != 1:
        raise ConfigError(f"the template's {replica_type} has no container named {CONTAINER!r}")
    return found[0]


def _set_container(replica_type: str, replica: dict, request: PyTorchJobRequest) -> None:
    container = _training_container(replica_type, replica)
    container["image"] = request.image or _template_image(container.get("image"), request)
    args = list(container.get("args") or [])
    if WORKER_MODULE not in args:
        raise ConfigError(
            f"the template's {replica_type} container args {args} do not run {WORKER_MODULE}; "
            f"the launcher keeps the args up to it (torchrun's) and puts the run's flags after it"
        )
    container["args"] = [*args[: args.index(WORKER_MODULE) + 1], *request.worker_args]
    resources = container.setdefault("resources", {})
    for kind in ("requests", "limits"):
        amounts = resources.setdefault(kind, {})
        others = [key for key in amounts if key.endswith("/gpu") and key != request.gpu_resource]
        if others:
            raise ConfigError(
                f"the template's {replica_type} {kind} {others[0]}, but the request is for "
                f"{request.gpu_resource}: use the template of the matching overlay, or set "
                "gpu_resource to the template's"
            )
        amounts[request.gpu_resource] = str(request.gpus_per_node)


def _template_image(image: str | None, request: PyTorchJobRequest) -> str:
    if image and "/" in image:
        return image
    # No registry in the name: kustomize's placeholder (`megasft-train`) of an unrendered template.
    from megasft.images import image_for

    family = TRAINING_IMAGE_FAMILIES.get(request.gpu_resource)
    if family is None:
        raise ConfigError(
            f"the template's image {image!r} is a placeholder and {request.gpu_resource} has no "
            "training image of its own; pass PyTorchJobRequest(image=...)"
        )
    return image_for(family).reference


def _check_save_is_on_a_claim(master: Mapping[str, Any], save: str) -> None:
    pod = master["template"].get("spec", {})
    claims = {
        volume["name"]
        for volume in pod.get("volumes") or []
        if "persistentVolumeClaim" in volume
        and not volume["persistentVolumeClaim"].get("readOnly", False)
    }
    container = _training_container("Master", master)
    mounts = [
        mount["mountPath"]
        for mount in container.get("volumeMounts") or []
        if mount.get("name") in claims and not mount.get("readOnly", False)
    ]
    save_path = PurePosixPath(save)
    if not any(save_path.is_relative_to(PurePosixPath(path)) for path in mounts):
        raise ConfigError(
            f"--save={save} is not on a writable PersistentVolumeClaim of the template "
            f"(mounted: {', '.join(mounts) or 'none'}): checkpoints written elsewhere are lost "
            "with the pod, and a retried job could not resume from them"
        )


# --- running it --------------------------------------------------------------------------------


def run_pytorchjob(
    request: PyTorchJobRequest,
    *,
    api_client: Any = None,
    template: Mapping[str, Any] | str | Path | None = None,
    poll_s: float = 10.0,
    log: TextIO | None = None,
) -> PyTorchJobResult:
    """Runs `request` as a PyTorchJob and waits for it; returns when it has succeeded.

    `api_client`: a `kubernetes.client.ApiClient`; default: the in-cluster configuration, else
    ~/.kube/config. `template`: the template as a dict or a YAML file (see `load_template`);
    default: `request.template_name` read from the cluster. The master's log and the launcher's
    own lines (prefixed `pytorchjob:`) go to `log` (default: sys.stdout at the time of the call).

    Raises PyTorchJobError when the job fails (with the job's condition message and the end of the
    master's log), when `request.timeout_s` passes, on SIGTERM (after deleting the job), or when the
    job is deleted by someone else. KeyboardInterrupt deletes the job and is raised again.
    """
    started = time.monotonic()
    deadline = None if request.timeout_s is None else started + request.timeout_s
    output = _Output(log if log is not None else sys.stdout)
    api_client = api_client if api_client is not None else _default_api_client()
    api = _JobApi(api_client, request, retry_s=poll_s)
    follower = _LogFollower(api, f"{request.name}-master-0", output, retry_s=poll_s)
    with _sigterm_raises():
        try:
            origin = _start(api, request, template, poll_s, deadline, output)
            follower.start()
            job = _wait(api, poll_s, deadline, output)
            follower.drain(LOG_DRAIN_S)
        except (_DeadlinePassed, KeyboardInterrupt, _Terminated) as interruption:
            follower.stop()
            raise _cancel(api, request, interruption, output) from None
        except BaseException:
            follower.stop()
            raise
    condition = _terminal_condition(job)
    assert condition is not None
    if condition["type"] == "Failed":
        raise PyTorchJobError(_failure_message(api, request, condition, follower.tail()), "failed")
    output.note(f"PyTorchJob {request.namespace}/{request.name} succeeded")
    return PyTorchJobResult(
        request.name, request.namespace, origin, follower.tail(), time.monotonic() - started
    )


def _start(
    api: _JobApi,
    request: PyTorchJobRequest,
    template: Mapping[str, Any] | str | Path | None,
    poll_s: float,
    deadline: float | None,
    output: _Output,
) -> str:
    """Creates the job or takes over an earlier attempt's; returns how (PyTorchJobResult.origin)."""
    where = f"{request.namespace}/{request.name}"
    existing = api.get()
    if existing is not None:
        condition = _terminal_condition(existing)
        if condition is None:
            output.note(f"adopting PyTorchJob {where}, started by an earlier attempt")
            return "adopted"
        if condition["type"] == "Succeeded":
            output.note(f"PyTorchJob {where} already succeeded in an earlier attempt")
            return "already-succeeded"
        output.note(
            f"PyTorchJob {where} of an earlier attempt failed ({condition.get('message', '')}); "
            f"deleting it and starting again from the newest checkpoint in {request.save_dir}"
        )
        api.delete()
        _wait_until_gone(api, poll_s, deadline)
    if isinstance(template, str | Path):
        template = load_template(template)
    elif template is None:
        template = read_template(api.client, request.namespace, request.template_name)
    job = build_pytorchjob(template, request)
    if not api.create(job):
        output.note(f"PyTorchJob {where} was created meanwhile by another attempt; adopting it")
        return "adopted"
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    image = next(container["image"] for container in master if container["name"] == CONTAINER)
    output.note(
        f"created PyTorchJob {where}: {request.nodes} node(s) x {request.gpus_per_node} "
        f"{request.gpu_resource}, image {image}"
    )
    return "created" if existing is None else "recreated"


def _wait_until_gone(api: _JobApi, poll_s: float, deadline: float | None) -> None:
    limit = time.monotonic() + DELETE_WAIT_S
    if deadline is not None:
        limit = min(limit, deadline)
    while api.get() is not None:
        if time.monotonic() >= limit:
            raise PyTorchJobError(
                f"PyTorchJob {api.where} is still being deleted (its pods are terminating); "
                "retry the step once it is gone (kubectl -n "
                f"{api.namespace} get pytorchjob {api.name})",
                "api",
            )
        time.sleep(poll_s)


def _wait(api: _JobApi, poll_s: float, deadline: float | None, output: _Output) -> dict:
    """Polls the job until it has a Succeeded or Failed condition; returns it.

    Raises _DeadlinePassed at `deadline`, PyTorchJobError when the job disappears.
    """
    reported: set[tuple[str, str]] = set()
    while True:
        job = api.get()
        if job is None:
            raise PyTorchJobError(
                f"PyTorchJob {api.where} was deleted while it ran (by someone else, or by "
                "garbage collection after its owner pod was deleted)",
                "deleted",
            )
        for condition in (job.get("status") or {}).get("conditions") or []:
            key = (condition["type"], condition.get("lastTransitionTime", ""))
            if condition.get("status") == "True" and key not in reported:
                reported.add(key)
                message = condition.get("message") or condition.get("reason") or ""
                output.note(f"{condition['type']}: {message}")
        if _terminal_condition(job) is not None:
            return job
        if deadline is None:
            time.sleep(poll_s)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlinePassed
        time.sleep(min(poll_s, remaining))


def _terminal_condition(job: Mapping[str, Any]) -> dict | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in TERMINAL and condition.get("status") == "True":
            return condition
    return None


def _cancel(
    api: _JobApi, request: PyTorchJobRequest, interruption: BaseException, output: _Output
) -> BaseException:
    """Deletes the job; returns what to raise for `interruption`."""
    try:
        api.delete(fresh_connection=True)
        deleted = "deleted it"
    except PyTorchJobError as error:
        deleted = f"could not delete it ({error}); its owner pod's deletion will"
    if isinstance(interruption, KeyboardInterrupt):
        output.note(f"interrupted: PyTorchJob {api.where}: {deleted}")
        return interruption
    resume = f"the checkpoints in {request.save_dir} are kept; running the step again resumes"
    if isinstance(interruption, _DeadlinePassed):
        message = (
            f"PyTorchJob {api.where} did not finish within timeout_s={request.timeout_s}; "
            f"{deleted}; {resume}"
        )
        output.note(message)
        return PyTorchJobError(message, "timeout")
    message = f"cancelled by SIGTERM: PyTorchJob {api.where}: {deleted}; {resume}"
    output.note(message)
    return PyTorchJobError(message, "cancelled")


def _failure_message(
    api: _JobApi, request: PyTorchJobRequest, condition: Mapping[str, Any], tail: Sequence[str]
) -> str:
    pod = f"{request.name}-master-0"
    lines = list(tail) or api.log_tail(pod, TAIL_LINES)
    reason = condition.get("reason", "")
    message = condition.get("message", "(no message)")
    return (
        f"PyTorchJob {api.where} failed: {reason + ': ' if reason else ''}{message}\n"
        f"The end of the master's log ({pod}):\n"
        + ("\n".join(lines) if lines else "(empty)")
        + f"\nThe job is kept for inspection (kubectl -n {api.namespace} describe pytorchjob "
        f"{api.name}); running the step again deletes it and resumes from the newest checkpoint "
        f"in {request.save_dir}."
    )


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises _Terminated in the main thread (once; a second one is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    received = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _default_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _api_error(error: Any, doing: str) -> PyTorchJobError:
    status = getattr(error, "status", None)
    body = (getattr(error, "body", None) or str(error)).strip()
    if status in (401, 403):
        return PyTorchJobError(
            f"{doing}: the API refused ({status}): {body}. The step's ServiceAccount needs the "
            "megasft-launcher Role (manifests/base/launcher-rbac.yaml binds it to default-editor, "
            "the pipeline runner of a Kubeflow profile; for standalone KFP use the "
            "components/kfp-standalone kustomize component)",
            "api",
        )
    return PyTorchJobError(f"{doing}: the Kubernetes API answered {status}: {body}", "api")


class _JobApi:
    """The calls the launcher makes, for one job: get, create, delete, and pod logs."""

    def __init__(self, api_client: Any, request: PyTorchJobRequest, retry_s: float) -> None:
        from kubernetes import client

        self.retry_s = retry_s
        self.client = api_client
        self.name = request.name
        self.namespace = request.namespace
        self.where = f"{request.namespace}/{request.name}"
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def get(self) -> dict | None:
        """The job, None when there is none.

        Rides out API_ERROR_LIMIT - 1 failed calls in a row (server errors, throttling, lost
        connections), waiting twice as long after each, from retry_s up to 30 s.
        """
        import urllib3
        from kubernetes.client import ApiException

        failures = 0
        while True:
            try:
                return self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name
                )
            except ApiException as error:
                if error.status == 404:
                    return None
                if error.status is not None and error.status < 500 and error.status != 429:
                    raise _api_error(error, f"reading PyTorchJob {self.where}") from None
                problem: Any = error
            except (urllib3.exceptions.HTTPError, OSError) as error:
                problem = error
            failures += 1
            if failures >= API_ERROR_LIMIT:
                raise PyTorchJobError(
                    f"reading PyTorchJob {self.where} failed {failures} times in a row "
                    f"(last: {problem}); the job was left as it is, so a retried step adopts it",
                    "api",
                ) from None
            time.sleep(min(self.retry_s * 2**failures, 30.0))

    def create(self, job: dict) -> bool:
        """Creates the job; False when one of its name exists already (409 Conflict)."""
        from kubernetes.client import ApiException

        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            if error.status == 404:
                raise PyTorchJobError(
                    f"creating PyTorchJob {self.where}: the API has no {PLURAL}.{GROUP}/{VERSION} "
                    f"in namespace {self.namespace}: is the Kubeflow training operator installed, "
                    "and does the namespace exist?",
                    "api",
                ) from None
            raise _api_error(error, f"creating PyTorchJob {self.where}") from None

    def delete(self, fresh_connection: bool = False) -> None:
        """Deletes the job and, first, its pods (foreground); a job that is gone already is fine.

        `fresh_connection`: after an interruption (SIGTERM, KeyboardInterrupt) that may have
        struck in the middle of a request, whose connection would then be unusable, delete over
        a connection pool of its own.
        """
        import urllib3
        from kubernetes import client

        custom = self.custom
        if fresh_connection:
            custom = client.CustomObjectsApi(client.ApiClient(self.client.configuration))
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, propagation_policy="Foreground"
            )
        except client.ApiException as error:
            if error.status != 404:
                raise _api_error(error, f"deleting PyTorchJob {self.where}") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise PyTorchJobError(f"deleting PyTorchJob {self.where}: {error}", "api") from None

    def open_log(self, pod: str, since_seconds: int | None) -> Any:
        """A follow stream of `pod`'s training container, with timestamps (an urllib3 response)."""
        return self.core.read_namespaced_pod_log(
            pod,
            self.namespace,
            container=CONTAINER,
            follow=True,
            timestamps=True,
            since_seconds=since_seconds,
            _preload_content=False,
            _request_timeout=(LOG_CONNECT_TIMEOUT_S, LOG_READ_TIMEOUT_S),
        )

    def log_tail(self, pod: str, lines: int) -> list[str]:
        """The last `lines` of `pod`'s log, read once; empty when it cannot be read."""
        import urllib3
        from kubernetes.client import ApiException

        try:
            text = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=CONTAINER, tail_lines=lines
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            return []
        return str(text).splitlines()


class _Output:
    """`log`, written to from the launcher and the log thread, one whole line at a time."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def note(self, text: str) -> None:
        self.line(f"pytorchjob: {text}")


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


def _log_time(stamp: str) -> tuple[int, int] | None:
    """An RFC 3339 timestamp of the kubelet (nanoseconds, trailing zeros trimmed) as (s, ns)."""
    match = _TIMESTAMP.fullmatch(stamp)
    if match is None:
        return None
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    return seconds, int((match.group(2) or "0").ljust(9, "0"))


class _LogFollower:
    """Follows one pod's training-container log in a thread: writes new lines, keeps the last ones.

    Lines are told apart by the kubelet's timestamps. `_last` is the newest timestamp written and
    `_written_at_last` how many lines carried it, so that a stream read again after a reconnect
    skips exactly what was written before, even lines that share one timestamp.
    """

    def __init__(self, api: _JobApi, pod: str, output: _Output, retry_s: float) -> None:
        self._api = api
        self._pod = pod
        self._output = output
        self._retry_s = retry_s
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._last: tuple[int, int] | None = None
        self._written_at_last = 0
        self._job_over = threading.Event()
        self._stopped = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"log {pod}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def tail(self) -> tuple[str, ...]:
        return tuple(self._tail)

    def drain(self, timeout_s: float) -> None:
        """The job is over: read what is left of the log, waiting at most `timeout_s`."""
        self._job_over.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.stop()

    def stop(self) -> None:
        """Stop now; lines not read yet are not written."""
        if not self._thread.is_alive():
            return
        self._stopped.set()
        self._job_over.set()
        response = self._response
        if response is not None:
            # Unblocks a read in progress (urllib3 >= 2.3); closing alone may not.
            with suppress(AttributeError, ValueError, RuntimeError, OSError):
                response.shutdown()
        self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stopped.is_set():
            final = self._job_over.is_set()  # a pass that starts after the end reads the last lines
            self._follow_once()
            if final:
                return
            self._job_over.wait(self._retry_s)

    def _follow_once(self) -> None:
        import urllib3
        from kubernetes.client import ApiException

        since = None
        if self._last is not None:
            since = max(1, int(time.time() - self._last[0]) + LOG_SKEW_MARGIN_S)
        try:
            response = self._api.open_log(self._pod, since)
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            return  # no pod yet (404), container not started (400), or no connection: retry later
        self._response = response
        ended = False  # the server ended the stream; else its connection is closed, not reused
        try:
            replayed_at_last = 0
            for raw in _lines(response):
                if self._stopped.is_set():
                    return
                stamp, _, text = raw.partition(" ")
                when = _log_time(stamp)
                if when is None:  # not a timestamped line: write it as it is
                    self._write(raw)
                    continue
                if self._last is not None and when <= self._last:
                    if when < self._last:
                        continue
                    replayed_at_last += 1
                    if replayed_at_last <= self._written_at_last:
                        continue
                    self._written_at_last += 1
                else:
                    self._last, self._written_at_last, replayed_at_last = when, 1, 1
                self._write(text)
            ended = True
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError):
            pass  # dropped or shut down: the next pass picks up after _last
        finally:
            self._response = None
            if not ended:
                response.close()
            response.release_conn()

    def _write(self, text: str) -> None:
        self._tail.append(text)
        self._output.line(text)


def _lines(response: Any) -> Iterator[str]:
    """The lines of a streamed HTTP response as they arrive (not when a buffer fills)."""
    read = getattr(response, "read1", None)
    chunks = iter(lambda: read(65536), b"") if read else response.stream(None)
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")
