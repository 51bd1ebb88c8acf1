"""The manifests grant the launcher, and the retraining job, what they need and nothing more.

"What they need" is read off the code, not restated: the Kubernetes client calls in
src/megasft/launch (for each job kind a registered launcher runs: the calls of the shared modules
and of the kind's own module), and the requests `megasft pipeline submit` sends (the real
kfp.Client against the KFP API stub of tests/pipeline), each mapped to the rule it needs.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from megasft.cli import main
from tests.conftest import REPO
from tests.deploy.rendering import (
    NAMESPACE,
    OVERLAYS,
    PYTORCHJOB_OVERLAYS,
    STANDALONE_NAMESPACE,
    container_arguments,
    objects_of,
    only,
    pod_specs,
)
from tests.pipeline.kfp_stub import API, KfpStub

# What megasft.launch does with the Kubernetes API, one rule per action, for each job kind.
LAUNCHER_NEEDS = {
    "TrainJob": {
        ("trainer.kubeflow.org", "trainjobs", "get"),  # poll a job until it ends
        ("trainer.kubeflow.org", "trainjobs", "create"),  # start a run's job
        ("trainer.kubeflow.org", "trainjobs", "delete"),  # cancel it when the run is stopped
        ("", "pods", "list"),  # find the first node's pod (and the first that failed) by label
        ("", "pods/log", "get"),  # stream its log, explain a failure
    },
    "PyTorchJob": {
        ("kubeflow.org", "pytorchjobs", "get"),  # read the template; poll a job until it ends
        ("kubeflow.org", "pytorchjobs", "create"),  # start a run's job
        ("kubeflow.org", "pytorchjobs", "delete"),  # cancel it when the pipeline run is stopped
        ("", "pods/log", "get"),  # stream <job>-master-0's log, explain a failure
    },
}
# The verb each kubernetes-client method on custom objects needs, on the resource of every job
# kind the launchers run; and the rule each other method the launcher calls needs.
CUSTOM_OBJECT_VERBS = {
    "get_namespaced_custom_object": "get",
    "create_namespaced_custom_object": "create",
    "delete_namespaced_custom_object": "delete",
}
LAUNCHER_CALLS = {
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "list_namespaced_pod": ("", "pods", "list"),
}
# What `megasft pipeline submit` asks of the KFP API, which checks it against RBAC.
RETRAIN_NEEDS = {
    ("pipelines.kubeflow.org", "pipelines", "get"),  # find the pipeline, its versions (older KFP)
    ("pipelines.kubeflow.org", "pipelines", "list"),  # the same, in KFP 2.5 and later
    ("pipelines.kubeflow.org", "pipelines", "create"),  # upload it, and each new version
    ("pipelines.kubeflow.org", "experiments", "list"),  # find the experiment by name
    ("pipelines.kubeflow.org", "experiments", "create"),  # the first time
    ("pipelines.kubeflow.org", "runs", "create"),
    ("pipelines.kubeflow.org", "runs", "get"),  # follow it (--wait)
}
# The SubjectAccessReviews the KFP API server (backend/src/apiserver/server) makes for each request
# `submit` sends, in a multi-user installation; where KFP versions differ, each verb they use.
# Pipeline versions are checked as their pipeline: KFP has no `pipelineversions` resource.
KFP = "pipelines.kubeflow.org"
KFP_CHECKS = {
    ("GET", "healthz"): set(),
    ("GET", "pipelines"): {(KFP, "pipelines", "get"), (KFP, "pipelines", "list")},
    ("POST", "pipelines/upload"): {(KFP, "pipelines", "create")},
    ("GET", "pipelines/ID/versions"): {(KFP, "pipelines", "get"), (KFP, "pipelines", "list")},
    ("POST", "pipelines/upload_version"): {(KFP, "pipelines", "create")},
    ("GET", "experiments"): {(KFP, "experiments", "list")},
    ("POST", "experiments"): {(KFP, "experiments", "create")},
    ("POST", "runs"): {(KFP, "runs", "create")},
    ("GET", "runs/ID"): {(KFP, "runs", "get")},
}
# The base's launcher Role is for TrainJobs; components/pytorchjob adds PyTorchJobs' rules.
TRAINJOB_ROLES = {"megasft-launcher": LAUNCHER_NEEDS["TrainJob"], "megasft-retrain": RETRAIN_NEEDS}
PYTORCHJOB_ROLES = {
    **TRAINJOB_ROLES,
    "megasft-launcher": LAUNCHER_NEEDS["TrainJob"] | LAUNCHER_NEEDS["PyTorchJob"],
}


def roles_of(overlay: str) -> dict[str, set[tuple[str, str, str]]]:
    return PYTORCHJOB_ROLES if overlay in PYTORCHJOB_OVERLAYS else TRAINJOB_ROLES


# Who may hold each role: our ServiceAccounts, and the account Kubeflow Pipelines runs the pipeline's
# steps as (the train step runs the launcher): default-editor in a Kubeflow profile.
KFP_RUNNER = "default-editor"
STANDALONE_KFP_RUNNER = "pipeline-runner"
HOLDERS = {
    "megasft-launcher": {"megasft-launcher", KFP_RUNNER},
    "megasft-retrain": {"megasft-retrain"},
}


def grants(role: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def holders(documents: list[dict], role: str) -> set[str]:
    (binding,) = [
        binding
        for binding in objects_of(documents, "RoleBinding")
        if binding["roleRef"]["name"] == role
    ]
    return {subject["name"] for subject in binding["subjects"]}


# -- the launcher ------------------------------------------------------------------------------


def kubernetes_calls(path: Path) -> set[str]:
    """The Kubernetes client methods a module calls that act on objects (get, list, create...)."""
    return {
        node.func.attr
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and re.search(r"_namespaced_|^(list|watch|patch|replace)_", node.func.attr)
    }


def test_the_launcher_role_is_exactly_what_the_launcher_calls():
    from megasft.launch.registry import launcher_classes

    kinds = {cls.job_kind for cls in launcher_classes().values() if getattr(cls, "job_kind", None)}
    modules = {kind.kind: Path(sys.modules[kind.build.__module__].__file__) for kind in kinds}
    sources = sorted((REPO / "src/megasft/launch").rglob("*.py"))
    shared = set().union(
        *(kubernetes_calls(path) for path in sources if path not in modules.values())
    )
    known = set(CUSTOM_OBJECT_VERBS) | set(LAUNCHER_CALLS)
    for kind in kinds:
        called = shared | kubernetes_calls(modules[kind.kind])
        assert called <= known, f"list the rule of {called - known}"
        needs = {LAUNCHER_CALLS[method] for method in called & set(LAUNCHER_CALLS)}
        needs |= {
            (kind.group, kind.plural, CUSTOM_OBJECT_VERBS[method])
            for method in called & set(CUSTOM_OBJECT_VERBS)
        }
        assert needs == LAUNCHER_NEEDS[kind.kind], kind.kind
    for path in sources:  # the job is polled, not watched
        source = path.read_text()
        assert "Watch(" not in source and "watch=" not in source


# -- the retraining job ------------------------------------------------------------------------


def kfp_route(method: str, path: str) -> tuple[str, str]:
    """A stub request as a KFP_CHECKS key: the path after /apis/v2beta1, ids replaced by ID."""
    assert path.startswith(f"{API}/"), path
    route = path.removeprefix(f"{API}/")
    route = re.sub(r"^pipelines/(?!upload)[^/]+/versions$", "pipelines/ID/versions", route)
    route = re.sub(r"^runs/[^/]+$", "runs/ID", route)
    return method, route


@pytest.fixture
def kfp(monkeypatch, tmp_path):
    """The KFP API stub, and a process without credentials or kfp context of its own."""
    for variable in (
        "KFP_TOKEN",
        "KF_PIPELINES_UI_ENDPOINT",
        "GITHUB_STEP_SUMMARY",
        "MLFLOW_TRACKING_URI",
        "http_proxy",
        "HTTP_PROXY",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    import kfp.client.client

    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "ctx.json"))
    with KfpStub() as stub:
        yield stub
    assert not stub.unexpected, f"requests the stub does not know: {stub.unexpected}"


def test_the_retrain_role_is_exactly_what_submit_asks_of_kfp(rendered, kfp, capsys):
    cronjob = only(rendered["overlays/mi300x"], "CronJob")
    ((_, spec),) = pod_specs(cronjob)
    (container,) = spec["containers"]
    arguments = container_arguments(cronjob, container)[1:]  # after `megasft`
    assert "--namespace=megasft" in arguments  # multi-user: KFP checks RBAC in the profile
    arguments = [f"--host={kfp.url}" if a.startswith("--host=") else a for a in arguments]
    kfp.run_states = ["SUCCEEDED"]

    assert main(arguments) == 0  # the first time: uploads the pipeline, creates the experiment
    assert main(arguments) == 0  # then: finds both, and the pipeline's version
    assert main([*arguments, "--wait"]) == 0  # as retrain.yml runs it
    capsys.readouterr()

    routes = {kfp_route(method, path) for method, path in kfp.requests}
    assert routes == set(KFP_CHECKS), "every request submit sends is listed, and only those"
    roles = {
        role["metadata"]["name"]: role for role in objects_of(rendered["overlays/mi300x"], "Role")
    }
    assert grants(roles["megasft-retrain"]) == set().union(*KFP_CHECKS.values()) == RETRAIN_NEEDS


# -- every overlay -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_grants_exactly_what_its_user_needs(rendered, overlay):
    roles = {role["metadata"]["name"]: role for role in objects_of(rendered[overlay], "Role")}
    assert set(roles) == set(TRAINJOB_ROLES), "a new Role must be listed here with what it is for"
    for name, needs in roles_of(overlay).items():
        assert grants(roles[name]) == needs, name
        for rule in roles[name]["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no URLs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_is_granted_cluster_wide_or_by_wildcard(rendered, overlay):
    kinds = {document["kind"] for document in rendered[overlay]}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    for role in objects_of(rendered[overlay], "Role"):
        for group, resource, verb in grants(role):
            assert "*" not in (group, resource, verb)
            assert resource not in {"secrets", "roles", "rolebindings", "serviceaccounts/token"}
            assert verb not in {"escalate", "bind", "impersonate"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_bindings_tie_each_role_to_its_holders_in_the_namespace(rendered, overlay):
    accounts = {
        account["metadata"]["name"] for account in objects_of(rendered[overlay], "ServiceAccount")
    }
    bindings = objects_of(rendered[overlay], "RoleBinding")
    assert {binding["roleRef"]["name"] for binding in bindings} == set(TRAINJOB_ROLES)
    for binding in bindings:
        role = binding["roleRef"]["name"]
        assert binding["roleRef"]["kind"] == "Role"  # never a ClusterRole
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["name"] in HOLDERS[role]
            assert subject["name"] in accounts or subject["name"] == KFP_RUNNER
            # Without a namespace, a RoleBinding's subject is in the binding's own namespace.
            assert subject.get("namespace", NAMESPACE) == NAMESPACE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pipeline_steps_hold_the_launcher_role(rendered, overlay):
    # The train step runs the launcher, as KFP's runner: without this the step gets a 403.
    assert holders(rendered[overlay], "megasft-launcher") == {"megasft-launcher", KFP_RUNNER}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_of_ours_carries_a_kubernetes_api_token(rendered, overlay):
    accounts = {
        account["metadata"]["name"] for account in objects_of(rendered[overlay], "ServiceAccount")
    }
    for document in rendered[overlay]:
        for where, spec in pod_specs(document):
            assert spec.get("automountServiceAccountToken") is False, f"{document['kind']} {where}"
            assert spec.get("serviceAccountName", "default") in accounts | {"default"}


# -- standalone Kubeflow Pipelines -------------------------------------------------------------


def test_standalone_kfp_gives_the_launcher_role_to_its_runner_in_its_namespace(standalone):
    assert holders(standalone, "megasft-launcher") == {"megasft-launcher", STANDALONE_KFP_RUNNER}
    assert holders(standalone, "megasft-retrain") == {"megasft-retrain"}
    for binding in objects_of(standalone, "RoleBinding"):
        assert binding["metadata"]["namespace"] == STANDALONE_NAMESPACE
        for subject in binding["subjects"]:
            assert subject.get("namespace", STANDALONE_NAMESPACE) == STANDALONE_NAMESPACE
    roles = {role["metadata"]["name"]: grants(role) for role in objects_of(standalone, "Role")}
    assert roles == TRAINJOB_ROLES


def test_standalone_kfp_leaves_its_namespace_alone_and_submits_without_one(standalone):
    # KFP's namespace is not ours: no Namespace object (that `kubectl delete -k` would delete).
    assert not objects_of(standalone, "Namespace")
    assert {document["metadata"].get("namespace") for document in standalone} == {
        STANDALONE_NAMESPACE
    }
    cronjob = only(standalone, "CronJob")
    ((_, spec),) = pod_specs(cronjob)
    (container,) = spec["containers"]
    assert "--namespace=" in container_arguments(cronjob, container)  # empty: single-user KFP
