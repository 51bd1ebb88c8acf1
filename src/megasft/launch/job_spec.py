"""Building a cluster job from the cluster's template: the parts every job kind shares.

A job is a copy of a suspended template job with only a few fields replaced: the metadata (name,
labels, the owner pod), and in the training container the image, the args after
`megasft.train.worker`, and the GPU request and limit. Everything else stays the cluster's. The
job kinds (`megasft.launch.pytorchjob`, `megasft.launch.trainjob`) place these parts in their own
spec; docs/deploy.md lists the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from megasft.errors import ConfigError
from megasft.launch.job_api import JobKind
from megasft.launch.job_request import WORKER_MODULE, JobRequest

TEMPLATE_LABEL = "megasft/template"
# Where each accelerator's training image comes from when the template names no usable image.
TRAINING_IMAGES = {"amd.com/gpu": "train-rocm", "nvidia.com/gpu": "train-cuda"}


def check_template_kind(template: Mapping[str, Any], kind: JobKind) -> None:
    """Raises ConfigError unless `template` is a job of `kind`."""
    if template.get("apiVersion") != kind.api_version or template.get("kind") != kind.kind:
        raise ConfigError(
            f"the template is a {template.get('apiVersion')} {template.get('kind')}, "
            f"not a {kind.api_version} {kind.kind}"
        )


def job_metadata(template: Mapping[str, Any], request: JobRequest) -> dict[str, Any]:
    """A job's metadata: the request's name and namespace, the template's labels (less
    `megasft/template`) plus the request's, and the owner pod. Annotations, uid,
    resourceVersion and the template's other server fields are left behind."""
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
        # blockOwnerDeletion is left unset: it needs `update` on pods/finalizers, which the
        # launcher's Role does not grant.
        metadata["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": request.owner_name,
                "uid": request.owner_uid,
            }
        ]
    return metadata


def training_container(where: str, pod_template: Mapping[str, Any], name: str) -> dict:
    """The container `name` of a pod template; `where` names the template in errors."""
    containers = (pod_template or {}).get("spec", {}).get("containers") or []
    found = [container for container in containers if container.get("name") == name]
    if len(found) != 1:
        raise ConfigError(f"the template's {where} has no container named {name!r}")
    return found[0]


def set_training_container(where: str, container: dict, request: JobRequest) -> None:
    """Sets the image, the args after `megasft.train.worker` and the GPU request and limit.

    Args:
        where: names the container's place in the template, in errors.
        container: the training container, changed in place.
        request: the run.

    Raises:
        ConfigError: for args that do not run megasft.train.worker, or a template that asks
            for another GPU resource than the request.
    """
    container["image"] = request.image or _template_image(container.get("image"), request)
    container["args"] = with_worker_args(f"the template's {where} container", container, request)
    set_gpus(f"the template's {where}", container.setdefault("resources", {}), request)


def with_worker_args(where: str, container: Mapping[str, Any], request: JobRequest) -> list[str]:
    """The container's args up to `megasft.train.worker` (torchrun's), then the run's flags.

    Raises ConfigError, naming `where`, for args that do not run megasft.train.worker.
    """
    args = list(container.get("args") or [])
    if WORKER_MODULE not in args:
        raise ConfigError(
            f"{where} args {args} do not run {WORKER_MODULE}; the launcher keeps the args up to "
            "it (torchrun's) and puts the run's flags after it"
        )
    return [*args[: args.index(WORKER_MODULE) + 1], *request.worker_args]


def set_gpus(where: str, resources: dict, request: JobRequest) -> None:
    """Sets the request's GPUs per node as the request and the limit in `resources` (a container's
    resources, changed in place); raises ConfigError, naming `where`, for another GPU resource."""
    for kind in ("requests", "limits"):
        amounts = resources.setdefault(kind, {})
        others = [key for key in amounts if key.endswith("/gpu") and key != request.gpu_resource]
        if others:
            raise ConfigError(
                f"{where} {kind} {others[0]}, but the request is for {request.gpu_resource}: "
                "use the template of the matching overlay, or set gpu_resource to the template's"
            )
        amounts[request.gpu_resource] = str(request.gpus_per_node)


def _template_image(image: str | None, request: JobRequest) -> str:
    if image and "/" in image:
        return image
    # No registry in the name: kustomize's placeholder (`megasft-train`) of an unrendered template.
    from megasft.images import image_for

    name = TRAINING_IMAGES.get(request.gpu_resource)
    if name is None:
        raise ConfigError(
            f"the template's image {image!r} is a placeholder and {request.gpu_resource} has no "
            "training image of its own; pass JobRequest(image=...)"
        )
    return image_for(name).reference


def check_save_is_on_a_claim(
    pod_template: Mapping[str, Any], container: Mapping[str, Any], save: str
) -> None:
    """Raises ConfigError unless `save` is on a PersistentVolumeClaim that `container` of
    `pod_template` mounts writable: checkpoints elsewhere are lost with the pod."""
    pod = pod_template.get("spec", {})
    claims = {
        volume["name"]
        for volume in pod.get("volumes") or []
        if "persistentVolumeClaim" in volume
        and not volume["persistentVolumeClaim"].get("readOnly", False)
    }
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
