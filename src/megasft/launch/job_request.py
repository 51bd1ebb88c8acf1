"""What a training job on Kubernetes is asked to do, whatever its kind: `JobRequest`.

A request names the job (`job_name` makes a name a retried step computes again), the run's
`megasft train` flags, the nodes and GPUs, and the launching pod that owns the job. It is
checked on construction, before anything is created. The job kinds (`megasft.launch.pytorchjob`)
turn a request into their spec; docs/train.md ("Cluster launcher") explains the choices.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megasft.errors import ConfigError

TEMPLATE_NAME = "megasft-train-template"
WORKER_MODULE = "megasft.train.worker"
# The training operator names a Service and a pod `<job>-worker-<index>`; a Service name is a
# DNS-1035 label of at most 63 characters, which leaves 63 - len("-worker-") - 4 index digits.
MAX_NAME_LENGTH = 51
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
GPU_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")
# The downward-API variables that name the launching pod: ours first, then Kubeflow Pipelines'.
OWNER_VARIABLES = (("POD_NAME", "POD_UID"), ("KFP_POD_NAME", "KFP_POD_UID"))
NAMESPACE_VARIABLES = ("POD_NAMESPACE", "KFP_NAMESPACE")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "megasft"  # the manifests' namespace (manifests/base/kustomization.yaml)


def job_name(*parts: str, prefix: str = "megasft-train") -> str:
    """A job name that is the same for the same `parts`, so that a retried step finds its job.

    Args:
        parts: what identifies the job, e.g. the pipeline run's id and the task's name.
        prefix: the name's start.

    Returns:
        `prefix-` and 12 hex digits of the SHA-256 of the parts: a DNS-1035 label.

    Raises:
        ConfigError: for an empty part, or a prefix that does not make a DNS-1035 label.
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
    """Where the launching pod runs, which is where its job must run.

    Returns:
        POD_NAMESPACE or KFP_NAMESPACE, else the pod's service-account namespace, else `megasft`.
    """
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
        prog=f"python -m {WORKER_MODULE}", allow_abbrev=False, exit_on_error=False
    )
    add_train_arguments(parser)
    return parser


@dataclass(frozen=True)
class JobRequest:
    """One training run on the cluster: what a job kind changes in the cluster's template."""

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
    """Nodes (pods), each with `gpus_per_node` training processes."""
    gpus_per_node: int = 8
    """GPUs (and training processes) per node: each pod's GPU request and limit."""
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
    """Seconds from the call until the job is deleted and JobError raised; None: no limit."""
    template_name: str = TEMPLATE_NAME
    """The suspended template job in `namespace`, read when no template is passed."""

    def __post_init__(self) -> None:
        if len(self.name) > MAX_NAME_LENGTH or not DNS_1035_LABEL.fullmatch(self.name):
            raise ConfigError(
                f"job name {self.name!r} is not a DNS-1035 label of at most {MAX_NAME_LENGTH} "
                "characters (lower-case letters, digits and '-', starting with a letter); "
                "megasft.launch.job_request.job_name(run_id, task) makes one"
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
        self._check_owner()
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        _check_labels(self.labels)
        object.__setattr__(self, "train_args", tuple(self.train_args))
        object.__setattr__(self, "labels", dict(self.labels))
        self._parsed_train_args()  # refuses unknown flags and a missing --save now, not in the pod

    def _check_owner(self) -> None:
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
        """`train_args` with --require-accelerator (the job asks for GPUs: training must not
        fall back to the CPU), and --nproc and --nodes where they are missing."""
        parsed = self._parsed_train_args()
        extra = [] if parsed.require_accelerator else ["--require-accelerator"]
        if parsed.nproc is None:
            extra.append(f"--nproc={self.gpus_per_node}")
        if parsed.nodes is None:
            extra.append(f"--nodes={self.nodes}")
        return [*self.train_args, *extra]


def _check_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
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
