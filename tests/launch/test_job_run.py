"""Running a cluster job (`run_job`, through the PyTorchJob kind): waiting, the master's log,
failures, timeouts, cancellation and retries.

No cluster exists here: the real `kubernetes.client` talks to `KubernetesStub`
(tests/launch/kubernetes_stub.py), a stub of the API server in a thread that serves scripted job
statuses and pod logs. What the training operator and the kubelet would do is the stub's script,
so these tests check the launcher's side of the conversation only.
"""

from __future__ import annotations

import _thread
import io
import signal
import time

import pytest
import yaml

from megasft.launch.job_api import JobError
from megasft.launch.job_request import JobRequest
from megasft.launch.job_run import run_job
from megasft.launch.pytorchjob import PYTORCHJOB
from tests.conftest import REPO
from tests.launch.kubernetes_stub import KubernetesStub, status

NAME = "megasft-train-0123456789ab"
MASTER = f"{NAME}-master-0"
TEMPLATE = REPO / "manifests/components/pytorchjob/pytorchjob-template.yaml"
POLL_S = 0.02


def make_request(**overrides) -> JobRequest:
    settings = {
        "name": NAME,
        "namespace": "megasft",
        "train_args": (
            "--data=/data/sft",
            "--load=/checkpoints/base-mcore",
            f"--save=/checkpoints/runs/{NAME}",
            "--train-iters=100",
        ),
        "owner_name": "launcher-pod",
        "owner_uid": "uid-1",
        "nodes": 2,
    }
    return JobRequest(**{**settings, **overrides})


@pytest.fixture
def stub():
    with KubernetesStub() as server:
        yield server
    assert not server.unexpected, "the launcher called what the stub does not serve"


def launch(stub: KubernetesStub, request: JobRequest | None = None, **options):
    log = io.StringIO()
    options.setdefault("template", TEMPLATE)
    try:
        result = run_job(
            PYTORCHJOB,
            request or make_request(),
            api_client=stub.api_client(),
            poll_s=POLL_S,
            log=log,
            **options,
        )
    except BaseException as error:
        error.log = log.getvalue()
        raise
    return result, log.getvalue()


def launcher_role() -> set[tuple[str, str, str]]:
    """The launcher's Role with the rule components/pytorchjob adds to it."""
    documents = yaml.safe_load_all((REPO / "manifests/base/launcher-rbac.yaml").read_text())
    (role,) = [document for document in documents if document["kind"] == "Role"]
    component = yaml.safe_load(
        (REPO / "manifests/components/pytorchjob/kustomization.yaml").read_text()
    )
    (patch,) = [entry for entry in component["patches"] if entry["target"]["kind"] == "Role"]
    (added,) = yaml.safe_load(patch["patch"])
    return {
        (group, resource, verb)
        for rule in [*role["rules"], added["value"]]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def training_lines(count: int, prefix: str = "step") -> list[str]:
    return [f"{prefix} {index}: loss {1.0 / (index + 1):.4f}" for index in range(count)]


def test_success_streams_the_masters_log_once_each_line(stub):
    lines = training_lines(9)
    stub.logs[MASTER] = [lines]
    stub.log_unavailable = 2  # the container is still being created
    stub.drop_first_stream_after = 3  # then the connection drops after three lines
    stub.script(NAME, status("Created"), status("Running"), status("Running"), status("Succeeded"))
    result, log = launch(stub)
    assert (result.name, result.origin) == (NAME, "created")
    master_lines = [line for line in log.splitlines() if not line.startswith("pytorchjob: ")]
    assert master_lines == lines  # every line, in order, none twice after the reconnect
    assert result.log_tail[-1] == lines[-1]
    log_queries = [query for _, path, query in stub.requests if path.endswith(f"/{MASTER}/log")]
    assert "sinceSeconds" not in log_queries[0] and "sinceSeconds" in log_queries[-1]
    assert "pytorchjob: created PyTorchJob megasft/" + NAME in log
    assert "pytorchjob: Succeeded: PyTorchJob is succeeded." in log
    (created,) = stub.created
    assert created["spec"]["runPolicy"]["suspend"] is False
    assert created["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert stub.rbac_requests() <= launcher_role()  # nothing the launcher's Role does not grant


def test_the_template_is_read_from_the_cluster_by_default(stub):
    template = yaml.safe_load(TEMPLATE.read_text())
    template["metadata"]["namespace"] = "megasft"
    stub.seed(template)
    stub.logs[MASTER] = [["done"]]
    stub.script(NAME, status("Succeeded"))
    result, _ = launch(stub, template=None)
    assert result.origin == "created"
    assert ("GET", "/apis/kubeflow.org/v1/namespaces/megasft/pytorchjobs/megasft-train-template", {}) in stub.requests  # fmt: skip
    assert stub.created[0]["metadata"]["labels"] == {
        "app.kubernetes.io/name": "megasft-train",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "megasft",
    }


def test_a_missing_template_says_to_apply_the_manifests(stub):
    with pytest.raises(JobError, match="no PyTorchJob template megasft/megasft-train-template"):
        launch(stub, template=None)
    assert not stub.created


def test_failure_raises_with_the_condition_and_the_masters_last_lines(stub):
    first = training_lines(4) + ["RuntimeError: NCCL timeout"]
    second = training_lines(40, "resumed step") + ["Traceback (most recent call last):", "ValueError: the real cause"]  # fmt: skip
    stub.logs[MASTER] = [first, second]  # the container failed, restarted, and failed again
    stub.status_waits_for_log = True  # the first container's lines are read while it runs
    message = "PyTorchJob megasft-train-0123456789ab is failed because 1 Master replica(s) failed."
    stub.script(
        NAME,
        status("Running"),
        status("Restarting", "Master restarting", at=1),
        status("Running", at=2),
        status("Failed", message, at=3),
    )
    with pytest.raises(JobError) as caught:
        launch(stub)
    error = caught.value
    assert error.reason == "failed"
    text = str(error)
    assert text.startswith(f"PyTorchJob megasft/{NAME} failed: PyTorchJobFailed: {message}")
    assert "Traceback (most recent call last):\nValueError: the real cause\nThe job is kept" in text
    assert "resumed step 39" in text and "resumed step 9:" not in text  # only the tail
    assert "Restarting: Master restarting" in error.log
    assert "RuntimeError: NCCL timeout" in error.log  # the first container's lines were streamed
    assert not stub.deleted  # kept for inspection; the next attempt deletes it


def test_a_timeout_deletes_the_job(stub):
    stub.logs[MASTER] = [training_lines(2)]
    stub.hold_log_open = True  # the container keeps running
    stub.script(NAME, status("Running"))
    started = time.monotonic()
    with pytest.raises(JobError, match="did not finish within timeout_s=0.3") as caught:
        launch(stub, make_request(timeout_s=0.3))
    assert time.monotonic() - started < 1.5  # a log stream still open does not hold it up
    assert caught.value.reason == "timeout"
    assert stub.deleted == [(NAME, {"propagationPolicy": ["Foreground"]})]


def test_sigterm_deletes_the_job_and_restores_the_handler(stub):
    stub.logs[MASTER] = [training_lines(2)]
    stub.hold_log_open = True
    stub.script(NAME, status("Running"))
    stub.on_get = lambda name, gets: gets == 3 and signal.raise_signal(signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobError, match="cancelled by SIGTERM") as caught:
        launch(stub)
    assert caught.value.reason == "cancelled"
    assert [name for name, _ in stub.deleted] == [NAME]
    assert signal.getsignal(signal.SIGTERM) is before


def test_keyboard_interrupt_deletes_the_job_and_propagates(stub):
    stub.logs[MASTER] = [training_lines(2)]
    stub.script(NAME, status("Running"))
    stub.on_get = lambda name, gets: gets == 2 and _thread.interrupt_main()
    with pytest.raises(KeyboardInterrupt):
        launch(stub)
    assert [name for name, _ in stub.deleted] == [NAME]


def test_a_retry_recreates_a_failed_job_to_resume_from_the_checkpoint(stub):
    request = make_request()
    failed = yaml.safe_load(TEMPLATE.read_text()) | {"metadata": {"name": NAME}}
    stub.seed(failed, status("Failed", "1 Worker replica(s) failed."))
    stub.script(NAME, status("Running"), status("Succeeded"))
    stub.logs[MASTER] = [["resuming from iter_0000040", "step 41: loss 0.1"]]
    result, log = launch(stub, request)
    assert result.origin == "recreated"
    assert stub.deleted == [(NAME, {"propagationPolicy": ["Foreground"]})]
    (created,) = stub.created  # after the old one was gone
    container = created["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][
        0
    ]
    assert f"--save=/checkpoints/runs/{NAME}" in container["args"]  # the same checkpoints
    assert "deleting it and starting again from the newest checkpoint" in log


def test_a_retry_adopts_a_running_job(stub):
    running = yaml.safe_load(TEMPLATE.read_text()) | {"metadata": {"name": NAME}}
    stub.seed(running, status("Running"), status("Running"), status("Succeeded"))
    stub.logs[MASTER] = [training_lines(3)]
    result, log = launch(stub)
    assert result.origin == "adopted"
    assert not stub.created and not stub.deleted
    assert "step 2: loss 0.3333" in log


def test_a_retry_of_a_succeeded_job_does_not_train_again(stub):
    done = yaml.safe_load(TEMPLATE.read_text()) | {"metadata": {"name": NAME}}
    stub.seed(done, status("Succeeded"))
    stub.logs[MASTER] = [["saved iter_0000100"]]
    result, _ = launch(stub)
    assert result.origin == "already-succeeded"
    assert result.log_tail == ("saved iter_0000100",)
    assert not stub.created and not stub.deleted


def test_a_job_another_attempt_created_meanwhile_is_adopted(stub):
    stub.create_conflicts = 1
    stub.script(NAME, status("Running"), status("Succeeded"))
    stub.logs[MASTER] = [["step 0"]]
    result, log = launch(stub)
    assert result.origin == "adopted"
    assert "created meanwhile by another attempt; adopting it" in log


def test_server_errors_are_ridden_out_and_a_refusal_names_the_role(stub):
    stub.failing_gets = [500, 503]  # the API server restarting, say
    stub.script(NAME, status("Running"), status("Succeeded"))
    stub.logs[MASTER] = [["step 0"]]
    result, _ = launch(stub)
    assert result.origin == "created"
    stub.failing_gets = [403]
    with pytest.raises(JobError, match="refused .403.*needs the megasft-launcher Role"):
        launch(stub)


def test_a_job_deleted_by_someone_else_is_reported(stub):
    stub.logs[MASTER] = [["step 0"]]
    stub.script(NAME, status("Running"))
    stub.on_get = lambda name, gets: gets == 2 and stub.jobs.pop(name)
    with pytest.raises(JobError, match="was deleted while it ran") as caught:
        launch(stub)
    assert caught.value.reason == "deleted"
