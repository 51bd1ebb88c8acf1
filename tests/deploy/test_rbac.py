"""The manifests grant the launcher, and the retraining job, what they need and nothing more."""

from __future__ import annotations

import pytest

from tests.deploy.rendering import NAMESPACE, OVERLAYS, objects_of, pod_specs

# What megasft.launch does with the Kubernetes API, one rule per action.
LAUNCHER_NEEDS = {
    ("kubeflow.org", "pytorchjobs", "get"),  # read the template; poll a job's status
    ("kubeflow.org", "pytorchjobs", "create"),  # start a run's job
    ("kubeflow.org", "pytorchjobs", "watch"),  # follow the job to its end
    ("kubeflow.org", "pytorchjobs", "delete"),  # cancel it when the pipeline run is stopped
    ("", "pods/log", "get"),  # stream <job>-master-0's log, explain a failure
}
# What `megasft pipeline submit` asks of the KFP API, which checks it against RBAC.
RETRAIN_NEEDS = {
    ("pipelines.kubeflow.org", "experiments", "get"),
    ("pipelines.kubeflow.org", "experiments", "list"),  # find the experiment by name
    ("pipelines.kubeflow.org", "experiments", "create"),  # the first time
    ("pipelines.kubeflow.org", "runs", "create"),
    ("pipelines.kubeflow.org", "runs", "get"),  # report the run it started
}
ROLES = {"megasft-launcher": LAUNCHER_NEEDS, "megasft-retrain": RETRAIN_NEEDS}
# Who may hold each role: our ServiceAccounts, and KFP's runner in a profile namespace when the
# kfp-profile-runner component is used (examples/my-cluster).
HOLDERS = {"megasft-launcher": {"megasft-launcher", "default-editor"}, "megasft-retrain": {"megasft-retrain"}}  # fmt: skip


def grants(role: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_grants_exactly_what_its_user_needs(rendered, overlay):
    roles = {role["metadata"]["name"]: role for role in objects_of(rendered[overlay], "Role")}
    assert set(roles) == set(ROLES), "a new Role must be listed here with what it is for"
    for name, needs in ROLES.items():
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
    assert {binding["roleRef"]["name"] for binding in bindings} == set(ROLES)
    for binding in bindings:
        role = binding["roleRef"]["name"]
        assert binding["roleRef"]["kind"] == "Role"  # never a ClusterRole
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["name"] in HOLDERS[role]
            assert subject["name"] in accounts or subject["name"] == "default-editor"
            # Without a namespace, a RoleBinding's subject is in the binding's own namespace.
            assert subject.get("namespace", NAMESPACE) == NAMESPACE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_of_ours_carries_a_kubernetes_api_token(rendered, overlay):
    accounts = {
        account["metadata"]["name"] for account in objects_of(rendered[overlay], "ServiceAccount")
    }
    for document in rendered[overlay]:
        for where, spec in pod_specs(document):
            assert spec.get("automountServiceAccountToken") is False, f"{document['kind']} {where}"
            assert spec.get("serviceAccountName", "default") in accounts | {"default"}


def test_the_profile_runner_holds_the_launcher_role_only_where_asked(rendered):
    def holders(overlay):
        (binding,) = [
            binding
            for binding in objects_of(rendered[overlay], "RoleBinding")
            if binding["roleRef"]["name"] == "megasft-launcher"
        ]
        return {subject["name"] for subject in binding["subjects"]}

    assert holders("overlays/mi300x") == {"megasft-launcher"}
    assert holders("examples/my-cluster") == {"megasft-launcher", "default-editor"}
