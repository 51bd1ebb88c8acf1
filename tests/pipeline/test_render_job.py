"""`megasft pipeline render-job`: the job the train step would create, printed without a cluster."""

from __future__ import annotations

import pytest
import yaml

from megasft.cli import main
from megasft.errors import ConfigError
from megasft.launch.job_request import job_name
from megasft.launch.registry import TrainingPlan
from megasft.pipeline.config import load_pipeline_config
from megasft.pipeline.render import EXAMPLE_RUN_ID, render_job
from megasft.pipeline.steps import training_settings
from tests.conftest import REPO
from tests.deploy.crds import schema_errors, trainer_rule_errors, trainer_validator

RUN_ID = "6f0b7f5c-0000-4000-8000-000000000001"
TEMPLATE = REPO / "manifests/components/pytorchjob/pytorchjob-template.yaml"


@pytest.fixture(autouse=True)
def no_owner(monkeypatch):
    for variable in ("POD_NAME", "POD_UID", "KFP_POD_NAME", "KFP_POD_UID", "POD_NAMESPACE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)


def render_command(capsys, *arguments: str) -> dict:
    assert main(["pipeline", "render-job", *arguments]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_it_prints_the_trainjob_of_a_cluster_configuration(capsys):
    job = render_command(
        capsys, "--config", "qwen2.5-gsm8k", "--set", "launcher.nodes=4", "--run-id", RUN_ID
    )
    assert not schema_errors(trainer_validator("TrainJob"), job)
    assert not trainer_rule_errors(job)
    name = job_name(RUN_ID, "train")
    assert job["metadata"]["name"] == name
    assert job["spec"]["trainer"]["numNodes"] == 4
    assert f"--save=/checkpoints/runs/{name}/checkpoints" in job["spec"]["trainer"]["args"]
    # Exactly what the train step's launcher builds from the same configuration and run.
    config = load_pipeline_config("qwen2.5-gsm8k").with_overrides(["launcher.nodes=4"])
    sections = config.arguments()
    plan = TrainingPlan(
        settings=training_settings(
            sections["train"], sections["tracking"], sections["config_name"]
        ),
        dataset=REPO / "elsewhere",
        base_checkpoint=REPO / "elsewhere",
        output=REPO / "elsewhere",
        run_id=RUN_ID,
    )
    assert job == config.launcher.render(plan)


def test_a_pytorchjob_needs_its_template_as_a_file(capsys):
    config = ["--config", "llama2-7b-mi300x", "--set", "launcher.kind=pytorchjob"]
    assert main(["pipeline", "render-job", *config]) == 2
    assert "--set launcher.template=FILE" in capsys.readouterr().err
    job = render_command(capsys, *config, "--set", f"launcher.template={TEMPLATE}")
    assert (job["kind"], job["metadata"]["name"]) == (
        "PyTorchJob",
        job_name(EXAMPLE_RUN_ID, "train"),
    )
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]  # one node


def test_a_local_configuration_has_no_job_to_render(capsys):
    assert main(["pipeline", "render-job", "--config", "demo"]) == 2
    assert "creates no job; add --set launcher.kind=trainjob" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pipeline", "render-job"])  # --config is required here


def test_settings_that_do_not_fit_fail_as_the_step_would():
    config = load_pipeline_config("qwen2.5-gsm8k").with_overrides(["train.tensor_parallel=3"])
    with pytest.raises(ConfigError, match="= 3 does not divide 8"):
        render_job(config)


def test_config_help_lists_every_shipped_configuration(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "render-job", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    shipped = sorted(path.stem for path in (REPO / "pipelines" / "configs").glob("*.yaml"))
    assert len(shipped) >= 5
    assert f"({', '.join(shipped)})".replace(" ", "") in help_text.replace(" ", "")
