"""The Kubernetes API calls of the cluster launchers, for any job kind: `JobKind` and `JobApi`.

`JobKind` describes what differs between job kinds (PyTorchJob, TrainJob): the API resource,
the training container, how to find the primary pod, the conditions that end a job, how to
build the spec. `JobApi` makes the few calls the launcher's Role grants (get, create and delete
jobs; read pod logs); a kind's own calls (listing pods) are in its module:
tests/deploy/test_rbac.py derives the Role from the calls in src/megasft/launch. `kubernetes` is imported inside the functions, so `megasft --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megasft.errors import ConfigError, LaunchError
from megasft.launch.job_request import JobRequest

API_ERROR_LIMIT = 6  # consecutive failed polls (server errors, lost connections) before giving up
LOG_CONNECT_TIMEOUT_S = 30.0
# A follow stream without a line for this long is reopened: it catches half-open connections.
LOG_READ_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class JobKind:
    """One kind of training job on Kubernetes, as the shared launcher machinery needs it."""

    group: str
    """The API group, e.g. `kubeflow.org`."""
    version: str
    """The API version, e.g. `v1`."""
    plural: str
    """The resource, e.g. `pytorchjobs` (what the Role grants)."""
    kind: str
    """The kind, e.g. `PyTorchJob`: messages name jobs by it, the launcher's log lines start with
    it in lower case."""
    operator: str
    """What serves the kind, named when the API does not know it, e.g. `the Kubeflow training
    operator`."""
    container: str
    """The training container's name, whose log is followed."""
    primary: str
    """How messages name the primary pod, e.g. `master`."""
    primary_pod: Callable[[JobApi, str], str | None]
    """(API, job name) -> the primary pod's name, None while there is none; asked again after
    each log stream ends, so a pod whose name changes on restart is found again."""
    build: Callable[[Mapping[str, Any], JobRequest], dict]
    """(template, request) -> the job to create."""
    image_of: Callable[[Mapping[str, Any]], str]
    """A built job -> its training image (for the launcher's log)."""
    succeeded: str = "Succeeded"
    """The condition type of a job that succeeded."""
    failed: str = "Failed"
    """The condition type of a job that failed."""
    failed_pod: Callable[[JobApi, str], str | None] | None = None
    """(API, job name) -> the pod whose log explains a failure (the first that failed), None
    when there is none to tell; unset: the primary pod's log explains it."""
    status_line: Callable[[Mapping[str, Any]], str | None] | None = None
    """A polled job -> a line on what its conditions do not say (progress), written to the
    step's log when it changes; None: nothing to say."""
    granted_in: str = "manifests/base/launcher-rbac.yaml"
    """Where the manifests grant the launcher's Role this kind's rules, for a refusal's message."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def terminal_condition(self, job: Mapping[str, Any]) -> dict | None:
        """The job's Succeeded or Failed condition (by this kind's names), None while it runs."""
        for condition in (job.get("status") or {}).get("conditions") or []:
            ended = condition.get("type") in (self.succeeded, self.failed)
            if ended and condition.get("status") == "True":
                return condition
        return None


class JobError(LaunchError):
    """A job failed, timed out, was cancelled or deleted, or could not be created.

    `reason` is one of "failed", "timeout", "cancelled", "deleted", "api".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_template(kind: JobKind, path: str | Path) -> dict:
    """The one job of `kind` in a YAML file.

    Args:
        kind: the job kind to look for.
        path: a rendered overlay (`kubectl kustomize manifests/examples/training-operator-v1`,
            one of many documents) or a template file itself
            (manifests/components/pytorchjob/pytorchjob-template.yaml).

    Returns:
        The job, as a dict.

    Raises:
        ConfigError: when the file cannot be read or holds not exactly one job of `kind`.
    """
    path = Path(path)
    try:
        documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the {kind.kind} template {path}: {error}") from error
    jobs = [document for document in documents if document.get("kind") == kind.kind]
    if len(jobs) != 1:
        raise ConfigError(f"{path} holds {len(jobs)} {kind.kind}s; a template needs exactly one")
    return jobs[0]


def default_api_client() -> Any:
    """A `kubernetes.client.ApiClient`: the in-cluster configuration, else ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def api_error(
    error: Any, doing: str, permission: tuple[str, str] | None = None, granted_in: str = ""
) -> JobError:
    """A JobError for an ApiException met while `doing`.

    Args:
        error: the exception.
        doing: what was being done, e.g. "creating TrainJob megasft/x".
        permission: (verb, resource) that the call needs, e.g. ("create", "trainjobs.trainer.
            kubeflow.org"): a refusal (401, 403) names it and the Role that grants it.
        granted_in: where the manifests grant it (default: the base's launcher Role).

    Returns:
        The error to raise.
    """
    status = getattr(error, "status", None)
    body = (getattr(error, "body", None) or str(error)).strip()
    with contextlib.suppress(ValueError, AttributeError):  # a Status object: its message
        body = json.loads(body).get("message") or body
    if status in (401, 403):
        needs = f"`{permission[0]}` on `{permission[1]}`" if permission else "the call"
        return JobError(
            f"{doing}: the API refused ({status}): {body}. Missing permission: {needs}. The "
            "step's ServiceAccount needs the megasft-launcher Role, which grants it "
            f"({granted_in or 'manifests/base/launcher-rbac.yaml'}; the base binds the Role to "
            "default-editor, the pipeline runner of a Kubeflow profile; for standalone KFP use "
            "the components/kfp-standalone kustomize component)",
            "api",
        )
    return JobError(f"{doing}: the Kubernetes API answered {status}: {body}", "api")


class JobApi:
    """The calls the launcher makes, for one job: get, create, delete, and pod logs."""

    def __init__(
        self, api_client: Any, kind: JobKind, name: str, namespace: str, retry_s: float
    ) -> None:
        from kubernetes import client

        self.retry_s = retry_s
        self.client = api_client
        self.kind = kind
        self.name = name
        self.namespace = namespace
        self.where = f"{namespace}/{name}"
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        """For a kind's `primary_pod`; each call it makes needs a rule in the Role."""

    def _object(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def _refused(self, error: Any, doing: str, verb: str) -> JobError:
        kind = self.kind
        resource = f"{kind.plural}.{kind.group}"
        return api_error(error, doing, (verb, resource), kind.granted_in)

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
                return self.custom.get_namespaced_custom_object(*self._object(), self.name)
            except ApiException as error:
                if error.status == 404:
                    return None
                if error.status is not None and error.status < 500 and error.status != 429:
                    raise self._refused(
                        error, f"reading {self.kind.kind} {self.where}", "get"
                    ) from None
                problem: Any = error
            except (urllib3.exceptions.HTTPError, OSError) as error:
                problem = error
            failures += 1
            if failures >= API_ERROR_LIMIT:
                raise JobError(
                    f"reading {self.kind.kind} {self.where} failed {failures} times in a row "
                    f"(last: {problem}); the job was left as it is, so a retried step adopts it",
                    "api",
                ) from None
            time.sleep(min(self.retry_s * 2**failures, 30.0))

    def read_template(self, name: str) -> dict:
        """The suspended template job `name` in this namespace, read with `get`."""
        from kubernetes.client import ApiException

        kind = self.kind
        try:
            return self.custom.get_namespaced_custom_object(*self._object(), name)
        except ApiException as error:
            if error.status == 404:
                raise JobError(
                    f"no {kind.kind} template {self.namespace}/{name}: apply the manifests with "
                    f"it first ({kind.granted_in} in your overlay, docs/deploy.md), or, if the "
                    f"{kind.kind} resource itself is unknown, install {kind.operator}",
                    "api",
                ) from None
            raise self._refused(
                error, f"reading the template {self.namespace}/{name}", "get"
            ) from None

    def create(self, job: dict) -> bool:
        """Creates the job; False when one of its name exists already (409 Conflict)."""
        from kubernetes.client import ApiException

        kind = self.kind
        try:
            self.custom.create_namespaced_custom_object(*self._object(), job)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            if error.status == 404:
                raise JobError(
                    f"creating {kind.kind} {self.where}: the API has no "
                    f"{kind.plural}.{kind.group}/{kind.version} in namespace {self.namespace}: "
                    f"is {kind.operator} installed, and does the namespace exist?",
                    "api",
                ) from None
            raise self._refused(error, f"creating {kind.kind} {self.where}", "create") from None

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
                *self._object(), self.name, propagation_policy="Foreground"
            )
        except client.ApiException as error:
            if error.status != 404:
                raise self._refused(
                    error, f"deleting {self.kind.kind} {self.where}", "delete"
                ) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise JobError(f"deleting {self.kind.kind} {self.where}: {error}", "api") from None

    def open_log(self, pod: str, since_seconds: int | None) -> Any:
        """A follow stream of `pod`'s training container, with timestamps (an urllib3 response)."""
        return self.core.read_namespaced_pod_log(
            pod,
            self.namespace,
            container=self.kind.container,
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
                pod, self.namespace, container=self.kind.container, tail_lines=lines
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            return []
        return str(text).splitlines()

    def primary_pod(self) -> str | None:
        """The primary pod's name, as the kind finds it; None when it cannot be found now.

        Raises JobError when the API refuses the kind's calls (401, 403): retrying cannot help.
        """
        return self._find_pod(self.kind.primary_pod, f"the {self.kind.primary}'s pod")

    def failed_pod(self) -> str | None:
        """The pod whose log explains the job's failure, as the kind finds it; None when the
        kind cannot tell (see `JobKind.failed_pod`). Raises JobError as `primary_pod` does."""
        if self.kind.failed_pod is None:
            return None
        return self._find_pod(self.kind.failed_pod, "the pod that failed")

    def _find_pod(self, find: Callable[[JobApi, str], str | None], what: str) -> str | None:
        import urllib3
        from kubernetes.client import ApiException

        try:
            return find(self, self.name)
        except ApiException as error:
            if error.status in (401, 403):
                doing = f"finding {what} of {self.kind.kind} {self.where}"
                raise api_error(error, doing, granted_in=self.kind.granted_in) from None
            return None
        except (urllib3.exceptions.HTTPError, OSError):
            return None
