"""The cluster launchers' train step: staging, the job, the checkpoint brought back; and the shared
job machinery running a job kind other than PyTorchJob (its own resource, conditions and primary
pod), against the Kubernetes API stub (tests/launch/kubernetes_stub.py).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from megasft.errors import ConfigError
from megasft.launch import job_run
from megasft.launch.cluster import STAGED
from megasft.launch.job_api import JobError, JobKind
from megasft.launch.job_request import JobRequest, job_name
from megasft.launch.job_run import run_job
from megasft.launch.job_spec import job_metadata
from megasft.launch.pytorchjob import PyTorchJobLauncher
from megasft.launch.registry import TrainingPlan
from tests.conftest import REPO
from tests.launch.kubernetes_stub import KubernetesStub, status

TEMPLATE = REPO / "manifests/components/pytorchjob/pytorchjob-template.yaml"
RUN_ID = "6f0b7f5c-0000-4000-8000-000000000001"
NAME = job_name(RUN_ID, "train")


@pytest.fixture
def no_owner(monkeypatch):
    for variable in ("POD_NAME", "POD_UID", "KFP_POD_NAME", "KFP_POD_UID", "POD_NAMESPACE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)


@pytest.fixture
def stub(monkeypatch, no_owner):
    with KubernetesStub() as server:
        monkeypatch.setattr(job_run, "default_api_client", server.api_client)
        monkeypatch.setattr(PyTorchJobLauncher, "poll_s", 0.02)
        yield server
    assert not server.unexpected, "the launcher called what the stub does not serve"


def template_on(volume: Path, tmp_path: Path) -> Path:
    """The base template with its checkpoint claim mounted at `volume` (this machine's stand-in)."""
    template = yaml.safe_load(TEMPLATE.read_text())
    pod = template["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "checkpoints"]
    mount["mountPath"] = str(volume)
    path = tmp_path / "template.yaml"
    path.write_text(yaml.safe_dump(template))
    return path


def make_plan(tmp_path: Path, **settings) -> TrainingPlan:
    for name in ("dataset", "base"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "content").write_text(name)
    return TrainingPlan(
        settings={"train_iters": 2, "lr": 1e-3, **settings},
        dataset=tmp_path / "dataset",
        base_checkpoint=tmp_path / "base",
        output=tmp_path / "output",
        run_id=RUN_ID,
    )


def write_checkpoint(save: Path) -> None:
    """What the job's rank 0 leaves on the volume."""
    (save / "iter_0000002").mkdir(parents=True)
    (save / "iter_0000002" / "train_state.json").write_text("{}")
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    (save / "summary.json").write_text(json.dumps({"status": "completed", "steps": 2}))
    (save / "metrics.jsonl").write_text('{"step": 1}\n')


def test_a_pytorchjob_stages_the_inputs_and_brings_the_checkpoint_back(stub, tmp_path, capsys):
    volume = tmp_path / "volume"
    workspace = volume / "runs" / NAME
    launcher = PyTorchJobLauncher(
        namespace="megasft",
        workspace=str(volume / "runs"),
        template=str(template_on(volume, tmp_path)),
    )
    stub.script(NAME, status("Running"), status("Succeeded"))
    stub.logs[f"{NAME}-master-0"] = [["step 1", "step 2"]]
    stub.on_get = lambda name, gets: gets == 1 and write_checkpoint(workspace / "checkpoints")
    plan = make_plan(tmp_path, nproc=8)

    summary = launcher.run(plan)

    assert summary == {"status": "completed", "steps": 2}
    output = sorted(path.name for path in plan.output.iterdir())
    assert output == [
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
        "metrics.jsonl",
        "summary.json",
    ]
    for name, source in (("dataset", plan.dataset), ("base", plan.base_checkpoint)):
        assert (workspace / name / "content").read_text() == name
        assert (workspace / name / STAGED).read_text() == str(source)
    recipe = yaml.safe_load((workspace / "train.yaml").read_text())
    assert recipe == {"train_iters": 2, "lr": 1e-3}  # nproc comes from gpus_per_node
    (created,) = stub.created
    args = created["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert args["args"][2:] == [
        f"--config={workspace}/train.yaml",
        f"--data={workspace}/dataset",
        f"--load={workspace}/base",
        f"--save={workspace}/checkpoints",
        "--require-accelerator",  # a job that asked for GPUs never trains on the CPU
        "--nproc=8",
        "--nodes=1",
    ]
    assert created["metadata"]["labels"]["megasft/run"] == NAME
    captured = capsys.readouterr()
    assert f"pytorchjob: created PyTorchJob megasft/{NAME}" in captured.out
    assert "step 2" in captured.out
    assert f"megasft train: PyTorchJob {NAME} created, done" in captured.err

    # A retried step finds the job done and the inputs staged: nothing is copied or run again.
    (plan.dataset / "content").write_text("changed")
    assert launcher.run(plan) == summary
    assert (workspace / "dataset" / "content").read_text() == "dataset"
    assert len(stub.created) == 1
    assert f"PyTorchJob {NAME} already-succeeded, done" in capsys.readouterr().err


def test_train_nproc_must_be_the_gpus_per_node(stub, tmp_path):
    launcher = PyTorchJobLauncher(namespace="megasft", workspace=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="train.nproc 2 differs from launcher.gpus_per_node 8"):
        launcher.run(make_plan(tmp_path, nproc=2))
    assert not stub.requests


# -- another job kind ---------------------------------------------------------------------------


def build_trainjob(template: dict, request: JobRequest) -> dict:
    return {
        "apiVersion": "example.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": job_metadata(template, request),
        "spec": {"trainer": {"image": "trainer:1", "args": request.worker_args}},
    }


class NodeZero:
    """Finds the primary pod as a label query would: not there at first, renamed on a restart."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, api, name: str) -> str | None:
        self.calls += 1
        if self.calls == 1:
            return None
        return f"{name}-node-0-0-{'a' if self.calls == 2 else 'b'}"


def trainjob_kind() -> JobKind:
    return JobKind(
        group="example.org",
        version="v1alpha1",
        plural="trainjobs",
        kind="TrainJob",
        operator="Kubeflow Trainer",
        container="node",
        primary="first node",
        primary_pod=NodeZero(),
        build=build_trainjob,
        image_of=lambda job: job["spec"]["trainer"]["image"],
        succeeded="Complete",
    )


def condition(kind: str, message: str = "") -> dict:
    return {"conditions": [{"type": kind, "status": "True", "message": message or kind}]}


def test_the_machinery_runs_any_job_kind(no_owner):
    kind = trainjob_kind()
    request = JobRequest(
        name=NAME, namespace="megasft", train_args=["--save=/checkpoints/runs/x"], nodes=2
    )
    template = {"apiVersion": "example.org/v1alpha1", "kind": "TrainJob", "metadata": {}}
    with KubernetesStub(job_kind=kind) as stub:
        stub.script(NAME, condition("Created"), condition("Running"), condition("Complete"))
        stub.logs[f"{NAME}-node-0-0-a"] = [["first pod"]]
        stub.logs[f"{NAME}-node-0-0-b"] = [["after the restart"]]
        log = io.StringIO()
        result = run_job(
            kind, request, api_client=stub.api_client(), template=template, poll_s=0.02, log=log
        )
    assert not stub.unexpected
    assert result.origin == "created"
    assert stub.created[0]["spec"]["trainer"]["args"][-2:] == ["--nproc=8", "--nodes=2"]
    text = log.getvalue()
    assert (
        f"trainjob: created TrainJob megasft/{NAME}: 2 node(s) x 8 amd.com/gpu, image trainer:1"
        in text
    )
    assert "first pod" in text and "after the restart" in text
    assert f"trainjob: TrainJob megasft/{NAME} succeeded" in text
    assert stub.rbac_requests() == {
        ("example.org", "trainjobs", "create"),
        ("example.org", "trainjobs", "get"),
        ("", "pods/log", "get"),
    }


def test_a_failed_job_of_another_kind_names_its_primary_pod(no_owner):
    kind = trainjob_kind()
    request = JobRequest(name=NAME, namespace="megasft", train_args=["--save=/checkpoints/x"])
    template = {"apiVersion": "example.org/v1alpha1", "kind": "TrainJob", "metadata": {}}
    with KubernetesStub(job_kind=kind) as stub:
        stub.script(NAME, condition("Failed", "node-0 failed"))
        stub.logs[f"{NAME}-node-0-0-a"] = [["ValueError: the real cause"]]
        with pytest.raises(JobError) as caught:
            run_job(
                kind,
                request,
                api_client=stub.api_client(),
                template=template,
                poll_s=0.02,
                log=io.StringIO(),
            )
    message = str(caught.value)
    assert message.startswith(f"TrainJob megasft/{NAME} failed: node-0 failed\n")
    assert f"The end of the first node's log ({NAME}-node-0-0-" in message
    assert "ValueError: the real cause" in message
    assert f"kubectl -n megasft describe trainjob {NAME}" in message
