"""`megasft pipeline submit` against a stub of the KFP v2beta1 REST API (tests/pipeline/kfp_stub.py).

The real kfp.Client and the real compiled pipeline are used; only the server is a stand-in.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys

import pytest
import yaml

from megasft.cli import main
from megasft.errors import MegasftError
from megasft.pipeline import compile as compile_module
from megasft.pipeline import run_summary
from megasft.pipeline import submit as submit_module
from megasft.pipeline.config import load_pipeline_config
from megasft.pipeline.steps import PIPELINE_NAME
from megasft.pipeline.submit import pipeline_version_name, submit_pipeline
from tests.conftest import REPO
from tests.pipeline.kfp_stub import API, KfpStub

RUN_LINK = re.compile(r"^run link: (\S+)$", re.MULTILINE)
RUN_ID = re.compile(r"^run id: (\S+)$", re.MULTILINE)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No credentials, UI endpoint, summary file or kfp context from the machine running tests."""
    for variable in (
        "KFP_TOKEN",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_ENDPOINT",
        "GITHUB_STEP_SUMMARY",
        "MLFLOW_TRACKING_URI",
        "MEGASFT_IMAGE_TAG",
        "MEGASFT_IMAGE_REGISTRY",
        "MEGASFT_IMAGE_CPU",
        "http_proxy",
        "HTTP_PROXY",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    import kfp.client.client

    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "ctx.json"))


COMPILE_PIPELINE = compile_module.compile_pipeline


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return COMPILE_PIPELINE(tmp_path_factory.mktemp("compiled") / "sft-pipeline.yaml")


@pytest.fixture(autouse=True)
def compile_once(compiled, monkeypatch):
    """The real pipeline, compiled once per module (about half a second each time otherwise)."""

    def copy_compiled(output):
        return shutil.copyfile(compiled, output)

    monkeypatch.setattr(compile_module, "compile_pipeline", copy_compiled)


@pytest.fixture
def stub():
    with KfpStub() as server:
        yield server
    assert not server.unexpected, f"requests the stub does not know: {server.unexpected}"


@pytest.fixture(scope="module")
def config():
    return load_pipeline_config("demo")


def submit(config, stub, **options):
    arguments = dict(
        host=stub.url,
        experiment=None,
        wait=False,
        timeout_s=None,
        run_name=None,
        namespace=None,
        poll_interval_s=0.01,
    )
    arguments.update(options)
    return submit_pipeline(config, **arguments)


def only_run(stub) -> dict:
    (run,) = stub.runs.values()
    return run


def test_the_first_submission_uploads_the_pipeline_and_starts_a_run(stub, config, compiled, capsys):
    assert submit(config, stub) == 0

    (pipeline,) = stub.pipelines.values()
    assert pipeline["display_name"] == PIPELINE_NAME
    assert pipeline["namespace"] == ""  # no --namespace: a shared pipeline
    versions = stub.versions[pipeline["pipeline_id"]]
    # KFP names an uploaded pipeline's first version after the pipeline; ours comes next to it.
    assert [version["display_name"] for version in versions] == [
        PIPELINE_NAME,
        pipeline_version_name(compiled),
    ]
    package = stub.packages[versions[1]["pipeline_version_id"]]
    assert yaml.safe_load_all(package).__next__()["pipelineInfo"]["name"] == PIPELINE_NAME

    run = only_run(stub)
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline["pipeline_id"],
        "pipeline_version_id": versions[1]["pipeline_version_id"],
    }
    assert run["runtime_config"]["parameters"] == config.arguments()
    assert run["display_name"].startswith(f"{config.name}-")
    (experiment,) = stub.experiments.values()
    assert experiment["display_name"] == config.name  # no --experiment: the config's name
    assert run["experiment_id"] == experiment["experiment_id"]

    out = capsys.readouterr().out
    assert out.splitlines() == [  # stdout is the run alone; kfp's own prints go to stderr
        f"run id: {run['run_id']}",
        f"run link: {stub.url}/#/runs/details/{run['run_id']}",
    ]


def test_an_unchanged_pipeline_reuses_its_version(stub, config):
    submit(config, stub, experiment="retrain")
    submit(config, stub, experiment="retrain", run_name="second")

    assert stub.calls("POST", f"{API}/pipelines/upload") == 1
    assert stub.calls("POST", f"{API}/pipelines/upload_version") == 1  # the first time only
    first, second = stub.runs.values()
    assert first["pipeline_version_reference"] == second["pipeline_version_reference"]
    assert second["display_name"] == "second"
    assert [e["display_name"] for e in stub.experiments.values()] == ["retrain"]  # found again


def test_a_namespace_keeps_the_pipeline_and_the_experiment_in_that_profile(stub, config):
    submit(config, stub, namespace="team-a")
    submit(config, stub, namespace="team-a")
    submit(config, stub, namespace="")  # an unset CI variable: single-user, shared pipeline

    team, shared = stub.pipelines.values()
    assert (team["namespace"], shared["namespace"]) == ("team-a", "")
    assert len(stub.versions[team["pipeline_id"]]) == 2  # found again in its namespace
    assert [e.get("namespace") for e in stub.experiments.values()] == ["team-a", ""]


def test_a_changed_pipeline_uploads_a_new_version(stub, config, monkeypatch):
    monkeypatch.setattr(compile_module, "compile_pipeline", COMPILE_PIPELINE)  # compile each time
    submit(config, stub)
    # The image tag is read when the components are imported; compile from a fresh import.
    monkeypatch.setenv("MEGASFT_IMAGE_TAG", "retrained-1")
    for name in list(sys.modules):
        if name == "megasft._pipelines.sft_pipeline" or name.startswith("megasft._components."):
            monkeypatch.delitem(sys.modules, name)
    submit(config, stub)

    (versions,) = stub.versions.values()
    assert len(versions) == 3
    first, second = (stub.packages[v["pipeline_version_id"]] for v in versions[1:])
    assert "megasft/cpu:retrained-1" in second and "megasft/cpu:retrained-1" not in first
    runs = list(stub.runs.values())
    assert (
        runs[1]["pipeline_version_reference"]["pipeline_version_id"]
        == (versions[2]["pipeline_version_id"])
    )


def test_the_version_name_is_the_package_version_and_the_yaml_hash(tmp_path):
    one, same, other = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    one.write_text("a: 1\n")
    same.write_text("a: 1\n")
    other.write_text("a: 2\n")
    assert re.fullmatch(
        rf"{re.escape(submit_module.__version__)}-[0-9a-f]{{10}}", pipeline_version_name(one)
    )
    assert pipeline_version_name(one) == pipeline_version_name(same) != pipeline_version_name(other)


def test_wait_exits_0_when_the_run_succeeds(stub, config, capsys):
    stub.run_states = ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    assert submit(config, stub, wait=True) == 0
    err = capsys.readouterr().err
    assert "RUNNING" in err and "succeeded" in err


def test_wait_exits_1_with_the_error_when_the_run_fails(stub, config, capsys):
    stub.run_states = ["RUNNING", "FAILED"]
    stub.run_error = "train: exited with code 1"
    stub.failed_task = ("train", "PyTorchJob megasft-demo failed: rank 3 ran out of memory")
    assert submit(config, stub, wait=True) == 1
    err = capsys.readouterr().err
    assert "ended FAILED" in err
    assert "error: train: exited with code 1" in err
    assert "step train: FAILED: PyTorchJob megasft-demo failed: rank 3 ran out of memory" in err
    assert "step validate" not in err


def test_wait_exits_1_when_the_run_is_canceled(stub, config):
    stub.run_states = ["RUNNING", "CANCELING", "CANCELED"]
    assert submit(config, stub, wait=True) == 1


def test_wait_gives_up_after_the_timeout_with_exit_3(stub, config, capsys):
    stub.run_states = ["RUNNING"]  # never finishes
    assert submit(config, stub, wait=True, timeout_s=0.3, poll_interval_s=0.05) == 3
    err = capsys.readouterr().err
    assert "still RUNNING after 0.3 s (--timeout)" in err and "the run keeps going" in err


def test_ctrl_c_while_waiting_exits_130_and_leaves_the_run_running(
    stub, config, capsys, monkeypatch
):
    stub.run_states = ["RUNNING"]

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit_module.time, "sleep", interrupt)
    assert submit(config, stub, wait=True) == 130
    err = capsys.readouterr().err
    assert "keeps running in Kubeflow" in err
    assert stub.calls("POST", f"{API}/runs") == 1  # nothing terminated it


def test_through_the_cli_with_a_token_and_a_step_summary(config, capsys, monkeypatch, tmp_path):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("KFP_TOKEN", "s3cret")
    with KfpStub(token="s3cret") as stub:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stub.url)  # the stub answers MLflow's two calls
        stub.mlflow_experiments["megasft-demo"] = "7"
        stub.run_states = ["RUNNING", "SUCCEEDED"]
        monkeypatch.setattr(submit_module, "POLL_INTERVAL_S", 0.01)  # the CLI passes none
        code = main(
            ["pipeline", "submit", "--host", stub.url + "/", "--config", "demo", "--wait",
             "--experiment", "ci", "--set", "train.train_iters=20"]
        )  # fmt: skip
        assert code == 0
        run = only_run(stub)
        stub.mlflow_runs[run["run_id"]] = "abc123"
        assert not stub.unexpected
    assert run["runtime_config"]["parameters"]["train"]["train_iters"] == 20
    out = capsys.readouterr().out
    assert RUN_ID.search(out).group(1) == run["run_id"]
    link = RUN_LINK.search(out).group(1)
    assert link == f"{stub.url}/#/runs/details/{run['run_id']}"  # trailing slash of --host gone
    text = summary.read_text()
    assert "| state | SUCCEEDED |" in text
    assert f"({link})" in text
    assert f"{stub.url}/#/experiments/7" in text  # the run search came back empty at that time


def test_the_mlflow_link_names_the_parent_run_when_mlflow_knows_it(config, monkeypatch):
    with KfpStub() as stub:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stub.url)
        assert run_summary.mlflow_link(config, "kfp-run-1") == stub.url  # no such experiment
        stub.mlflow_experiments["megasft-demo"] = "7"
        stub.mlflow_runs["kfp-run-1"] = "abc123"
        assert run_summary.mlflow_link(config, "kfp-run-1") == (
            f"{stub.url}/#/experiments/7/runs/abc123"
        )
    assert run_summary.mlflow_link(config, "kfp-run-1") == stub.url  # server gone: base URL
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert run_summary.mlflow_link(config, "kfp-run-1") is None  # demo: sqlite, no server


def test_the_ui_endpoint_variable_moves_the_link(stub, config, capsys, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_UI_ENDPOINT", "https://kubeflow.example.com/pipeline/")
    submit(config, stub)
    run = only_run(stub)
    assert f"run link: https://kubeflow.example.com/pipeline/#/runs/details/{run['run_id']}" in (
        capsys.readouterr().out
    )


def test_a_refused_token_is_an_error_that_says_so(config, monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "wrong")
    with KfpStub(token="right") as stub:
        assert main(["pipeline", "submit", "--host", stub.url, "--config", "demo"]) == 2
        assert not stub.runs
    err = capsys.readouterr().err
    assert "not authorized (HTTP 401)" in err and "$KFP_TOKEN was refused" in err


def test_the_service_account_token_file_is_sent(config, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("projected-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    with KfpStub(token="projected-token") as stub:
        submit(config, stub)
        assert len(stub.runs) == 1


def test_an_unreachable_host_is_an_error_that_says_so(config):
    with KfpStub() as stub:
        url = stub.url  # a port that was just free and now is closed again
    with pytest.raises(MegasftError, match=f"cannot reach KFP at {re.escape(url)}"):
        submit_pipeline(
            config, host=url, experiment=None, wait=False, timeout_s=None, run_name=None,
            namespace=None,
        )  # fmt: skip


def test_a_host_without_a_scheme_is_refused(config, capsys):
    assert main(["pipeline", "submit", "--host", "kfp.example.com", "--config", "demo"]) == 2
    assert "with its scheme" in capsys.readouterr().err


def test_the_readme_shows_the_equivalent_kfp_command():
    """The README's `kfp run create` passes the qwen2.5-gsm8k sections as kfp parses NAME=JSON."""
    from kfp.cli.utils.parsing import parse_parameter_value

    readme = (REPO / "README.md").read_text()
    (command,) = [
        block for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
        if block.startswith("kfp --endpoint")
    ]  # fmt: skip
    words = shlex.split(command)
    assert words[words.index("run") + 1] == "create"
    assert words[words.index("--package-file") + 1] == "sft.yaml"
    assert "megasft pipeline compile --output sft.yaml" in readme
    arguments = {
        name: parse_parameter_value(value)
        for name, value in (word.split("=", 1) for word in words if re.match(r"^\w+=", word))
    }
    expected = load_pipeline_config("qwen2.5-gsm8k").arguments()
    assert arguments == expected, (
        "README.md: the `kfp run create` example no longer matches "
        "pipelines/configs/qwen2.5-gsm8k.yaml; regenerate its NAME=JSON arguments"
    )
    assert words[words.index("--experiment-name") + 1] == expected["config_name"]
