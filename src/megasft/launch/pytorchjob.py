"""The `pytorchjob` launcher: one Kubeflow PyTorchJob (kubeflow.org/v1) per training run.

This module holds only what is particular to PyTorchJobs: the kind's description (`PYTORCHJOB`:
its API resource, its `pytorch` container, its primary pod `<job>-master-0`, its conditions) and
its spec (`build_pytorchjob`). Running, waiting, logs, retries and cancellation are the shared
machinery's (`megasft.launch.job_run`), staging and settings `megasft.launch.cluster`'s.
docs/train.md ("Cluster launcher") and docs/deploy.md describe the job and the template.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from megasft.errors import ConfigError
from megasft.launch.cluster import ClusterLauncher
from megasft.launch.job_api import JobApi, JobKind
from megasft.launch.job_request import JobRequest
from megasft.launch.job_spec import (
    check_save_is_on_a_claim,
    check_template_kind,
    job_metadata,
    set_training_container,
    training_container,
)
from megasft.launch.registry import register_launcher

CONTAINER = "pytorch"  # the training operator requires this container name
PRIMARY = "Master"  # the replica type of the pod that runs rank 0


def _master_pod(api: JobApi, name: str) -> str:
    # The training operator names the pods `<job>-master-0` and `<job>-worker-N`: no listing.
    return f"{name}-master-0"


def build_pytorchjob(template: Mapping[str, Any], request: JobRequest) -> dict:
    """The PyTorchJob that runs `request`: a copy of `template` with only these fields replaced.

    metadata (see `job_spec.job_metadata`); `status` removed; spec.runPolicy.suspend false;
    spec.nprocPerNode; Worker replicas (nodes - 1; no Worker for one node); and in the `pytorch`
    container of each replica the image, the args and the GPU request and limit (see
    `job_spec.set_training_container`). A Worker with an empty pod template (the base template,
    before kustomize copies the Master's into it) gets the Master's.

    Args:
        template: the cluster's suspended template PyTorchJob.
        request: the run.

    Returns:
        The job to create.

    Raises:
        ConfigError: for a template that is not a kubeflow.org/v1 PyTorchJob with a Master whose
            `pytorch` container runs megasft.train.worker, or a `--save` not on a writable claim.
    """
    check_template_kind(template, PYTORCHJOB)
    job = copy.deepcopy(dict(template))
    job.pop("status", None)
    job["metadata"] = job_metadata(template, request)
    spec = job.setdefault("spec", {})
    spec.setdefault("runPolicy", {})["suspend"] = False
    spec["nprocPerNode"] = str(request.gpus_per_node)
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if PRIMARY not in replicas:
        raise ConfigError(f"the template has no {PRIMARY} in spec.pytorchReplicaSpecs")
    master = replicas[PRIMARY]
    master["replicas"] = 1
    if request.nodes == 1:
        replicas.pop("Worker", None)
    else:
        worker = replicas.setdefault("Worker", {"restartPolicy": master.get("restartPolicy")})
        if not worker.get("template"):
            worker["template"] = copy.deepcopy(master["template"])
        worker["replicas"] = request.nodes - 1
    for replica_type, replica in replicas.items():
        container = training_container(replica_type, replica.get("template"), CONTAINER)
        set_training_container(replica_type, container, request)
    master_container = training_container(PRIMARY, master["template"], CONTAINER)
    check_save_is_on_a_claim(master["template"], master_container, request.save_dir)
    return job


def _master_image(job: Mapping[str, Any]) -> str:
    master = job["spec"]["pytorchReplicaSpecs"][PRIMARY]
    return training_container(PRIMARY, master["template"], CONTAINER)["image"]


PYTORCHJOB = JobKind(
    group="kubeflow.org",
    version="v1",
    plural="pytorchjobs",
    kind="PyTorchJob",
    operator="the Kubeflow training operator",
    container=CONTAINER,
    primary="master",
    primary_pod=_master_pod,
    build=build_pytorchjob,
    image_of=_master_image,
    granted_in="manifests/components/pytorchjob",
)


@register_launcher
@dataclass(frozen=True)
class PyTorchJobLauncher(ClusterLauncher):
    """`launcher.kind: pytorchjob`: training as a PyTorchJob from the cluster's template."""

    kind: ClassVar[str] = "pytorchjob"
    job_kind: ClassVar[JobKind] = PYTORCHJOB
