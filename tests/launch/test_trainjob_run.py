"""A TrainJob run by the `trainjob` launcher against the Kubernetes API stub: created or adopted,
followed on its first node, ended by its conditions, deleted on a timeout or SIGTERM, refused.

No cluster, Trainer or JobSet controller exists here: the real `kubernetes` client talks to
`KubernetesStub` (tests/launch/kubernetes_stub.py), whose script stands for what Trainer writes
into the TrainJob's status and for the pods JobSet makes, so these tests check the launcher's
side of the conversation only.
"""

from __future__ import annotations

import io
import json
import signal

import pytest
import yaml

from megasft.launch import job_run
from megasft.launch.job_api import JobError
from megasft.launch.job_request import JobRequest, job_name
from megasft.launch.job_run import run_job
from megasft.launch.registry import TrainingPlan
from megasft.launch.trainjob import TRAINJOB, TrainJobLauncher
from tests.conftest import REPO
from tests.launch.kubernetes_stub import KubernetesStub, jobset_pod, trainjob_status

NAME = "megasft-train-0123456789ab"
NODE_0 = f"{NAME}-node-0-0-abcde"
POLL_S = 0.02
TRAINJOBS = ("trainer.kubeflow.org", "trainjobs")


@pytest.fixture
def stub(monkeypatch):
    for variable in ("POD_NAME", "POD_UID", "KFP_POD_NAME", "KFP_POD_UID", "POD_NAMESPACE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)
    with KubernetesStub(job_kind=TRAINJOB) as server:
        server.pods[NODE_0] = jobset_pod(NAME, 0, "abcde")
        yield server
    assert not server.unexpected, "the launcher called what the stub does not serve"


def make_request(**overrides) -> JobRequest:
    settings = {
        "name": NAME,
        "namespace": "megasft",
        "train_args": ("--data=/d", "--load=/l", f"--save=/checkpoints/runs/{NAME}/checkpoints"),
        "nodes": 2,
        "owner_name": "launcher-pod",
        "owner_uid": "uid-1",
    }
    return JobRequest(**{**settings, **overrides})


def launch(stub: KubernetesStub, request: JobRequest | None = None):
    log = io.StringIO()
    try:
        result = run_job(
            TRAINJOB,
            request or make_request(),
            api_client=stub.api_client(),
            template=TrainJobLauncher().job_template(),
            poll_s=POLL_S,
            log=log,
        )
    except BaseException as error:
        error.log = log.getvalue()
        raise
    return result, log.getvalue()


def existing_job() -> dict:
    return TrainJobLauncher().job_template() | {"metadata": {"name": NAME}}


def launcher_role() -> set[tuple[str, str, str]]:
    documents = yaml.safe_load_all((REPO / "manifests/base/launcher-rbac.yaml").read_text())
    (role,) = [document for document in documents if document["kind"] == "Role"]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_success_follows_the_first_node_and_reports_progress(stub):
    stub.pods[f"{NAME}-node-0-1-fghij"] = jobset_pod(NAME, 1, "fghij")  # node 1: not followed
    stub.logs[NODE_0] = [["step 1: loss 2.0"], ["resuming from iter_0000001", "step 2: loss 1.5"]]
    stub.logs[f"{NAME}-node-0-1-fghij"] = [["a line of node 1"]]
    halfway = {
        "progressPercentage": 50,
        "estimatedRemainingSeconds": 3900,
        "metrics": [{"name": "loss", "value": "1.5"}],
    }
    stub.script(
        NAME,
        trainjob_status("Created"),
        trainjob_status("Created", progress=halfway),
        trainjob_status("Created", progress=halfway),
        trainjob_status("Complete", at=1),
    )
    result, log = launch(stub)
    assert result.origin == "created"
    training = [line for line in log.splitlines() if not line.startswith("trainjob: ")]
    assert training == ["step 1: loss 2.0", "resuming from iter_0000001", "step 2: loss 1.5"]
    assert "a line of node 1" not in log
    assert log.count("trainjob: progress: 50%, about 1 h 05 min left, loss 1.5\n") == 1
    assert "trainjob: Created: Succeeded to create Jobs" in log
    assert f"trainjob: created TrainJob megasft/{NAME}: 2 node(s) x 8 amd.com/gpu, image megasft-mi300x's" in log  # fmt: skip
    assert "trainjob: Complete: jobset completed" in log
    (created,) = stub.created
    assert created["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert created["spec"]["trainer"]["numNodes"] == 2
    # The Role's rules but `delete`, which only a cancelled or retried run needs.
    assert stub.rbac_requests() == launcher_role() - {(*TRAINJOBS, "delete")}


def test_the_first_node_is_the_newest_live_pod_of_completion_index_0(stub):
    stub.pods = {
        f"{NAME}-node-0-0-old": jobset_pod(NAME, 0, "old", created=1)
        | {"metadata": jobset_pod(NAME, 0, "old")["metadata"] | {"deletionTimestamp": "x"}},
        f"{NAME}-node-0-0-new": jobset_pod(NAME, 0, "new", created=5),
        f"{NAME}-node-0-0-older": jobset_pod(NAME, 0, "older", created=0),
        f"{NAME}-node-0-1-later": jobset_pod(NAME, 1, "later", created=9),
        "other-node-0-0-x": jobset_pod("other", 0, "x", created=9),
    }
    annotated = jobset_pod(NAME, 0, "annotated", created=7)  # Kubernetes < 1.28: an annotation
    index = annotated["metadata"]["labels"].pop("batch.kubernetes.io/job-completion-index")
    annotated["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": index}
    stub.pods[annotated["metadata"]["name"]] = annotated
    from megasft.launch.job_api import JobApi

    api = JobApi(stub.api_client(), TRAINJOB, NAME, "megasft", retry_s=POLL_S)
    assert api.primary_pod() == f"{NAME}-node-0-0-annotated"
    (_, path, query), *_ = stub.requests
    assert path == "/api/v1/namespaces/megasft/pods"
    assert query["labelSelector"] == [
        f"jobset.sigs.k8s.io/jobset-name={NAME},jobset.sigs.k8s.io/replicatedjob-name=node"
    ]


def test_failure_raises_with_the_condition_and_the_first_failed_pods_log(stub):
    node_2 = f"{NAME}-node-0-2-klmno"
    stub.pods[NODE_0] = jobset_pod(NAME, 0, "abcde", exit_code=1, finished_at=30)
    stub.pods[node_2] = jobset_pod(NAME, 2, "klmno", exit_code=1, finished_at=10)
    stub.logs[NODE_0] = [["step 7: loss 1.1", "RuntimeError: NCCL communicator was aborted"]]
    stub.logs[node_2] = [["step 7: loss 1.1", "torch.OutOfMemoryError: HIP out of memory"]]
    message = "jobset failed: ReplicatedJob node has failed"
    stub.script(NAME, trainjob_status("Created"), trainjob_status("Failed", message, at=2))
    with pytest.raises(JobError) as caught:
        launch(stub, make_request(nodes=3))
    text = str(caught.value)
    assert caught.value.reason == "failed"
    assert text.startswith(f"TrainJob megasft/{NAME} failed: JobSetFailed: {message}\n")
    assert f"The end of the log of {node_2}, the first pod that failed:\n" in text
    assert "torch.OutOfMemoryError: HIP out of memory\nThe job is kept" in text
    assert f"kubectl -n megasft describe trainjob {NAME}" in text
    assert "newest checkpoint in /checkpoints/runs/" in text
    assert not stub.deleted  # kept for inspection; the next attempt deletes it


def test_a_failure_of_the_first_node_itself_quotes_the_log_followed(stub):
    stub.pods[NODE_0] = jobset_pod(NAME, 0, "abcde", exit_code=2, finished_at=5)
    stub.logs[NODE_0] = [["ValueError: the real cause"]]
    stub.status_waits_for_log = True
    stub.script(NAME, trainjob_status("Created"), trainjob_status("Failed", at=1))
    with pytest.raises(
        JobError, match=rf"The end of the first node's log \({NODE_0}\):\nValueError"
    ):
        launch(stub)


def test_a_timeout_deletes_the_trainjob(stub):
    stub.logs[NODE_0] = [["step 1"]]
    stub.hold_log_open = True
    stub.script(NAME, trainjob_status("Created"))
    with pytest.raises(JobError, match="did not finish within timeout_s=0.3") as caught:
        launch(stub, make_request(timeout_s=0.3))
    assert caught.value.reason == "timeout"
    assert stub.deleted == [(NAME, {"propagationPolicy": ["Foreground"]})]


def test_sigterm_deletes_the_trainjob(stub):
    stub.logs[NODE_0] = [["step 1"]]
    stub.hold_log_open = True
    stub.script(NAME, trainjob_status("Created"))
    stub.on_get = lambda name, gets: gets == 3 and signal.raise_signal(signal.SIGTERM)
    with pytest.raises(JobError, match="cancelled by SIGTERM") as caught:
        launch(stub)
    assert caught.value.reason == "cancelled"
    assert [name for name, _ in stub.deleted] == [NAME]


def test_a_refused_create_names_the_missing_permission(stub):
    stub.forbidden = {(*TRAINJOBS, "create")}
    with pytest.raises(JobError) as caught:
        launch(stub)
    text = str(caught.value)
    assert text.startswith(f"creating TrainJob megasft/{NAME}: the API refused (403): ")
    assert 'cannot create resource "trainjobs" in API group "trainer.kubeflow.org"' in text
    assert "Missing permission: `create` on `trainjobs.trainer.kubeflow.org`" in text
    assert "needs the megasft-launcher Role" in text
    assert "manifests/base/launcher-rbac.yaml" in text


def test_without_list_on_pods_the_job_is_still_waited_for_and_the_log_says_why(stub):
    stub.forbidden = {("", "pods", "list")}
    stub.script(NAME, trainjob_status("Created"), trainjob_status("Complete", at=1))
    result, log = launch(stub)
    assert result.origin == "created"
    assert "trainjob: not following the log: finding the first node's pod" not in log
    assert "trainjob: not following the log: listing the pods of TrainJob megasft/" in log
    assert "Missing permission: `list` on `pods`" in log
    assert log.count("not following the log") == 1


def test_a_trainjob_another_attempt_created_meanwhile_is_adopted(stub):
    stub.create_conflicts = 1
    stub.script(NAME, trainjob_status("Created"), trainjob_status("Complete", at=1))
    stub.logs[NODE_0] = [["step 0"]]
    result, log = launch(stub)
    assert result.origin == "adopted"
    assert "created meanwhile by another attempt; adopting it" in log


def test_a_retry_adopts_a_running_trainjob(stub):
    stub.seed(existing_job(), trainjob_status("Created"), trainjob_status("Complete", at=1))
    stub.logs[NODE_0] = [["step 3"]]
    result, log = launch(stub)
    assert result.origin == "adopted"
    assert not stub.created and not stub.deleted
    assert "step 3" in log


def test_a_retry_of_a_completed_trainjob_does_not_train_again(stub):
    stub.seed(existing_job(), trainjob_status("Complete"))
    stub.logs[NODE_0] = [["saved iter_0000100"]]
    result, _ = launch(stub)
    assert result.origin == "already-succeeded"
    assert not stub.created and not stub.deleted


def test_a_retry_recreates_a_failed_trainjob_to_resume_from_the_checkpoint(stub):
    stub.seed(existing_job(), trainjob_status("Failed", "node 1 failed"))
    stub.script(NAME, trainjob_status("Created"), trainjob_status("Complete", at=1))
    stub.logs[NODE_0] = [["resuming from iter_0000040"]]
    result, log = launch(stub)
    assert result.origin == "recreated"
    assert stub.deleted == [(NAME, {"propagationPolicy": ["Foreground"]})]
    (created,) = stub.created
    assert f"--save=/checkpoints/runs/{NAME}/checkpoints" in created["spec"]["trainer"]["args"]
    assert "deleting it and starting again from the newest checkpoint" in log


def test_a_jobset_that_cannot_be_made_is_reported(stub):
    stub.script(
        NAME,
        {
            "conditions": [
                {
                    "type": "Created",
                    "status": "False",
                    "reason": "JobsBuildFailed",
                    "message": 'ClusterTrainingRuntime "megasft-mi300x" not found',
                }
            ]
        },
        trainjob_status("Failed", at=1),
    )
    with pytest.raises(JobError) as caught:
        launch(stub)
    # Before anything ends it (here `Failed`), the step's log says why nothing runs.
    assert (
        'trainjob: not started: JobsBuildFailed: ClusterTrainingRuntime "megasft-mi300x" not found'
        in caught.value.log
    )


# -- the launcher: staging, the job, the checkpoint brought back -------------------------------


def test_the_trainjob_launcher_trains_and_creates_exactly_what_render_shows(tmp_path, monkeypatch):
    for variable in ("POD_NAME", "POD_UID", "KFP_POD_NAME", "KFP_POD_UID", "POD_NAMESPACE"):
        monkeypatch.delenv(variable, raising=False)
    run_id = "6f0b7f5c-0000-4000-8000-000000000001"
    name = job_name(run_id, "train")
    volume = tmp_path / "volume"
    launcher = TrainJobLauncher(
        namespace="megasft",
        workspace=str(volume / "runs"),
        claims={"megasft-checkpoints": str(volume), "megasft-data": "/data"},
    )
    for part in ("dataset", "base"):
        (tmp_path / part).mkdir()
    plan = TrainingPlan(
        settings={"train_iters": 2, "lr": 1e-3},
        dataset=tmp_path / "dataset",
        base_checkpoint=tmp_path / "base",
        output=tmp_path / "output",
        run_id=run_id,
    )

    def write_checkpoint(job: str, gets: int) -> None:
        save = volume / "runs" / name / "checkpoints"
        if gets == 1:
            (save / "iter_0000002").mkdir(parents=True)
            (save / "iter_0000002" / "train_state.json").write_text("{}")
            (save / "latest_checkpointed_iteration.txt").write_text("2")
            (save / "summary.json").write_text(json.dumps({"status": "completed", "steps": 2}))

    monkeypatch.setattr(TrainJobLauncher, "poll_s", POLL_S)
    with KubernetesStub(job_kind=TRAINJOB) as stub:
        monkeypatch.setattr(job_run, "default_api_client", stub.api_client)
        stub.script(name, trainjob_status("Created"), trainjob_status("Complete", at=1))
        stub.on_get = write_checkpoint
        summary = launcher.run(plan)
    assert summary == {"status": "completed", "steps": 2}
    assert (plan.output / "iter_0000002").is_dir()
    (created,) = stub.created
    assert created == launcher.render(plan)
