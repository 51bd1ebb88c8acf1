"""The CI workflows parse, pin their actions, and run only what the Makefile, the CLI or a script has.

ci.yml lints, compiles the pipeline and tests; retrain.yml submits the pipeline to Kubeflow when a
run configuration or a data pointer changes, on a schedule, and by hand. Nothing here talks to
GitHub or to Kubeflow: the workflows are read as data, their commands are checked against the
Makefile (`make -n`) and `megasft`'s own parser, and the script that picks the configurations runs
against a throwaway git repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.deploy.commands import commands, makefile_targets, unknown_commands

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
SCRIPTS = REPO / ".github" / "scripts"
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}")
# The secrets the workflows may read: named in docs/deploy.md, set in the repository's settings.
DOCUMENTED_SECRETS = {"KFP_HOST", "KFP_TOKEN", "MLFLOW_TRACKING_URI"}
# What an environment variable of a step stands for when its command is checked (${{ }} values).
SAMPLE_VALUES = {
    "KFP_HOST": "https://kubeflow.example.com/pipeline",
    "KFP_NAMESPACE": "",  # unset repository variable: single-user KFP
    "CONFIG": "qwen2.5-gsm8k",
    "WAIT": "--wait",
}
MEGASFT = ("megasft", ".venv/bin/megasft")
PYTHONS = ("python3", ".venv/bin/python")


def load(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads `on:` as True
    return workflow


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def job_steps(workflow: dict) -> list[tuple[dict, dict]]:
    return [(job, step) for job in workflow["jobs"].values() for step in job["steps"]]


RETRAIN = load(REPO / ".github/workflows/retrain.yml")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_workflow_parses_and_is_least_privileged(path):
    workflow = load(path)
    assert workflow["on"], "no trigger (`on:`)"
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert job["runs-on"] and job["steps"] and job["timeout-minutes"]
        assert job["timeout-minutes"] <= 360  # GitHub-hosted runners stop jobs at 6 hours


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_actions_are_pinned_by_commit(path):
    for step in steps(load(path)):
        if "uses" in step:
            assert PINNED_ACTION.match(step["uses"]), f"{step['uses']} is not pinned by commit"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_every_command_is_a_makefile_target_a_megasft_command_or_a_script(path):
    targets = makefile_targets()
    for job, step in job_steps(load(path)):
        if "run" not in step:
            continue
        # Expressions go through `env:`, never into the script itself (no script injection).
        assert "${{" not in step["run"], step["run"]
        environment = {**job.get("env", {}), **step.get("env", {})}
        for words in commands(expand(step["run"], environment)):
            if words[0] == "make":
                assert not unknown_commands(shlex.join(words), targets, None), words
                # make itself agrees the targets exist (nothing runs)
                dry_run = subprocess.run(
                    ["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True
                )
                assert dry_run.returncode == 0, dry_run.stderr
            elif words[0] in MEGASFT:
                check_megasft_accepts(words[1:])
            elif words[0] in PYTHONS:
                script = REPO / words[1]
                assert script.parent == SCRIPTS and script.is_file(), words
            else:
                pytest.fail(f"{path.name}: {words[0]} is not make, megasft or a script: {words}")


def expand(script: str, environment: dict) -> str:
    """`$NAME` and `"$NAME"` replaced as the runner's shell would, for the step's environment.

    A variable set from an expression (`${{ secrets.X }}`) stands for its SAMPLE_VALUES entry.
    """

    def substitute(match: re.Match) -> str:
        quoted, name = match.group(1), match.group(2)
        assert name in environment, f"${name} is not in the step's env"
        value = str(environment[name])
        if EXPRESSION.search(value):
            assert name in SAMPLE_VALUES, f"add a sample value of {name} to SAMPLE_VALUES"
            value = SAMPLE_VALUES[name]
        return shlex.quote(value) if quoted else value

    return re.sub(r'("?)\$(\w+)\1', substitute, script)


def check_megasft_accepts(arguments: list[str]) -> None:
    from megasft.cli import build_parser

    try:
        build_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"megasft does not accept: megasft {shlex.join(arguments)}")


def test_ci_lints_compiles_the_pipeline_and_runs_the_readme_test_command():
    ran = [words for step in steps(load(REPO / ".github/workflows/ci.yml"))
           for words in commands(step.get("run", ""))]  # fmt: skip
    assert ["make", "lint"] in ran and ["make", "compile"] in ran and ["make", "test"] in ran


def test_the_command_check_itself():
    script = "make lint test\nFOO=1 make -j2 bench \\\n  && megasft pipeline submit --host x\nkubectl get pods | grep x"
    assert commands(script)[0] == ["make", "lint", "test"]
    assert unknown_commands(script, {"lint", "test", "bench"}, {"prepare", "train"}) == [
        "megasft pipeline",
        "kubectl",
        "grep",
    ]
    assert makefile_targets() >= {"setup", "test", "lint", "demo", "images", "compile"}
    assert expand('x --host "$HOST" $WAIT', {"HOST": "a b", "WAIT": ""}) == "x --host 'a b' "


# -- retrain.yml ------------------------------------------------------------------------------


def retrain_step(name: str) -> dict:
    (step,) = [step for step in RETRAIN["jobs"]["retrain"]["steps"] if step.get("name") == name]
    return step


def test_retraining_triggers_on_configs_and_data_pointers_a_schedule_and_by_hand():
    triggers = RETRAIN["on"]
    assert triggers["push"]["branches"] == ["main"]
    assert set(triggers["push"]["paths"]) == {"pipelines/configs/**", "data/pointers/**"}
    (schedule,) = triggers["schedule"]
    assert len(schedule["cron"].split()) == 5
    inputs = triggers["workflow_dispatch"]["inputs"]
    assert inputs["config"]["type"] == "string" and inputs["config"]["required"] is True
    assert inputs["wait"]["type"] == "boolean" and inputs["wait"]["default"] is True
    configs = {path.stem for path in (REPO / "pipelines/configs").glob("*.yaml")}
    assert inputs["config"]["default"] in configs
    plan = RETRAIN["jobs"]["plan"]["steps"][-1]
    assert plan["env"]["SCHEDULED_CONFIG"] in configs  # the production configuration


def test_retraining_submits_the_compiled_pipeline_and_waits():
    job = RETRAIN["jobs"]["retrain"]
    assert job["strategy"]["matrix"]["config"] == "${{ fromJSON(needs.plan.outputs.configs) }}"
    assert job["if"] == "needs.plan.outputs.configs != '[]'"  # an empty matrix is an error
    # Two retrainings of one configuration never overlap, and a running one is not canceled.
    assert job["concurrency"] == {
        "group": "retrain-${{ matrix.config }}",
        "cancel-in-progress": False,
    }
    ran = [words for step in job["steps"] for words in commands(step.get("run", ""))]
    assert ran[:2] == [["make", "setup"], ["make", "compile"]]
    (upload,) = [step for step in job["steps"] if "upload-artifact" in step.get("uses", "")]
    assert upload["with"]["path"] == compile_output()

    submit = retrain_step("Submit to Kubeflow")
    words = shlex.split(expand(submit["run"], submit["env"]))
    assert words[:3] == [".venv/bin/megasft", "pipeline", "submit"]
    from megasft.cli import build_parser

    arguments = build_parser().parse_args(words[1:])
    assert arguments.wait and arguments.config == "qwen2.5-gsm8k"
    assert arguments.host == SAMPLE_VALUES["KFP_HOST"]
    assert arguments.timeout < job["timeout-minutes"] * 60 - 10 * 60  # room for setup and compile
    assert submit["env"]["KFP_HOST"] == "${{ secrets.KFP_HOST }}"
    assert (
        submit["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    )  # read by megasft.pipeline.submit
    # waits unless a run by hand says otherwise
    assert submit["env"]["WAIT"] == (
        "${{ (github.event_name != 'workflow_dispatch' || inputs.wait) && '--wait' || '' }}"
    )


def compile_output() -> str:
    recipe = (REPO / "Makefile").read_text().split("\ncompile:", 1)[1].split("\n\n", 1)[0]
    return re.search(r"--output (\S+)", recipe).group(1)


def test_the_secrets_and_variables_are_the_documented_ones():
    text = (REPO / ".github/workflows/retrain.yml").read_text()
    secrets = set(re.findall(r"secrets\.(\w+)", text))
    variables = set(re.findall(r"vars\.(\w+)", text))
    assert secrets == DOCUMENTED_SECRETS
    deploy_guide = (REPO / "docs/deploy.md").read_text()
    for name in secrets | variables:
        assert f"`{name}`" in deploy_guide, f"docs/deploy.md does not explain {name}"


def test_compile_writes_into_an_ignored_build_directory():
    output = compile_output()
    assert output.startswith("build/")
    assert "build/" in (REPO / ".gitignore").read_text().split()


# -- choosing the configurations to retrain -----------------------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


retrain_configs = load_script("retrain_configs")


def test_changed_files_map_to_their_configurations():
    existing = {"demo", "qwen2.5-gsm8k"}
    paths = [
        "pipelines/configs/qwen2.5-gsm8k.yaml",
        "data/pointers/demo.yaml",
        "data/pointers/gone.yaml",  # a pointer without a configuration: nothing to retrain
        "pipelines/configs/README.md",
        "pipelines/sft_pipeline.py",
        "data/pointers/nested/demo.yaml",
    ]
    assert retrain_configs.configs_for_paths(paths, existing) == ["demo", "qwen2.5-gsm8k"]
    assert retrain_configs.configs_for_paths(["src/megasft/cli.py"], existing) == []


@pytest.fixture
def repository(tmp_path):
    """A git repository with the project's layout: one commit, then one that changes a pointer."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*arguments: str) -> str:
        result = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *arguments],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    for name in ("demo", "qwen2.5-gsm8k"):
        (tmp_path / "pipelines/configs").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"pipelines/configs/{name}.yaml").write_text(f"name: {name}\n")
    (tmp_path / "data/pointers").mkdir(parents=True)
    (tmp_path / "data/pointers/qwen2.5-gsm8k.yaml").write_text("sha256: 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    first = git("rev-parse", "HEAD")
    (tmp_path / "data/pointers/qwen2.5-gsm8k.yaml").write_text("sha256: 2\n")
    (tmp_path / "README.md").write_text("unrelated\n")
    git("add", ".")
    git("commit", "-q", "-m", "two")
    return tmp_path, first, git("rev-parse", "HEAD")


def run_plan(directory: Path, **environment: str) -> subprocess.CompletedProcess:
    output = directory / "github-output"
    output.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "retrain_configs.py")],
        cwd=directory,
        env={"PATH": os.environ["PATH"], "GITHUB_OUTPUT": str(output), **environment},
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        assert output.read_text() == result.stdout  # the job output is what it printed
    return result


def configs_of(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.removeprefix("configs="))


def test_a_push_retrains_the_configurations_it_touched(repository):
    directory, first, second = repository
    plan = run_plan(directory, EVENT_NAME="push", BEFORE=first, AFTER=second)
    assert configs_of(plan) == ["qwen2.5-gsm8k"]
    new_branch = run_plan(directory, EVENT_NAME="push", BEFORE="0" * 40, AFTER=second)
    assert configs_of(new_branch) == ["qwen2.5-gsm8k"]  # the last commit's own changes


def test_a_schedule_or_a_run_by_hand_retrains_the_configuration_named(repository):
    directory, _, _ = repository
    scheduled = run_plan(directory, EVENT_NAME="schedule", SCHEDULED_CONFIG="qwen2.5-gsm8k")
    assert configs_of(scheduled) == ["qwen2.5-gsm8k"]
    by_hand = run_plan(directory, EVENT_NAME="workflow_dispatch", INPUT_CONFIG="demo")
    assert configs_of(by_hand) == ["demo"]
    unknown = run_plan(directory, EVENT_NAME="workflow_dispatch", INPUT_CONFIG="qwen; rm -rf /")
    assert unknown.returncode != 0
    assert "no configuration 'qwen; rm -rf /'" in unknown.stderr and "known: demo" in unknown.stderr


def test_every_data_pointer_belongs_to_a_configuration_and_names_its_data():
    pointers = sorted((REPO / "data/pointers").glob("*.yaml"))
    assert pointers, "data/pointers holds no pointer"
    from megasft.pipeline.config import load_pipeline_config

    for pointer in pointers:
        values = yaml.safe_load(pointer.read_text())
        assert set(values) == {"path", "sha256"}, pointer.name
        assert re.fullmatch(r"[0-9a-f]{64}", values["sha256"]), pointer.name
        config = load_pipeline_config(pointer.stem)
        assert values["path"] == config.data["path"], (
            f"{pointer.name}: path differs from pipelines/configs/{pointer.name}'s data.path"
        )


# -- make setup: kubectl ------------------------------------------------------------------------


def fake_tools(directory: Path, *, uid: int, kubectl_package: bool, client_version: str) -> Path:
    """A PATH with the tools the setup recipe uses; apt-get and apt-cache are stand-ins."""
    bin_directory = directory / "bin"
    bin_directory.mkdir()
    for tool in ("sh", "sed", "head", "touch", "dpkg", "cat", "echo"):
        if shutil.which(tool):
            (bin_directory / tool).symlink_to(shutil.which(tool))
    log = directory / "apt.log"
    scripts = {
        "id": f"echo {uid}",
        "apt-cache": f"printf 'kubernetes-client:\\n  Installed: (none)\\n  Candidate: {client_version}\\n'",
        "apt-get": (
            f'echo "$*" >> {log}\n'
            'case "$*" in *" kubectl"*) exit ' + ("0" if kubectl_package else "100") + ";; esac\n"
            "exit 0"
        ),
    }  # fmt: skip
    for name, body in scripts.items():
        script = bin_directory / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return bin_directory


def run_setup(tmp_path: Path, bin_directory: Path) -> tuple[str, str]:
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    stamp = venv / ".installed"
    stamp.touch()  # newer than pyproject.toml: only setup's own recipe runs
    result = subprocess.run(
        [shutil.which("make"), "--no-print-directory", "-C", str(REPO), "setup",
         f"VENV={venv}", f"STAMP={stamp}"],
        env={"PATH": str(bin_directory)}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # kubectl never fails setup
    log = tmp_path / "apt.log"
    return result.stdout, log.read_text() if log.exists() else ""


@pytest.fixture
def make_available():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")


def test_setup_installs_kubectl_from_the_distribution_when_absent(tmp_path, make_available):
    tools = fake_tools(tmp_path, uid=0, kubectl_package=True, client_version="1.20.5-1")
    out, apt = run_setup(tmp_path, tools)
    assert "update -qq" in apt and "install -y -qq kubectl" in apt
    assert "installed kubectl" in out
    out, apt_again = run_setup(tmp_path, tools)  # tried once per virtual environment
    assert apt_again == apt and "note: no kubectl" in out


def test_setup_takes_kubernetes_client_only_when_new_enough(tmp_path, make_available):
    old = tmp_path / "old"
    old.mkdir()
    tools = fake_tools(
        old, uid=0, kubectl_package=False, client_version="1.20.5+really1.20.2-1.1+deb12u1"
    )
    out, apt = run_setup(old, tools)
    assert "kubernetes-client" not in apt  # Debian 12's 1.20 cannot build the overlays
    assert "note: no kubectl 1.27+ in the distribution's packages" in out
    new = tmp_path / "new"
    new.mkdir()
    tools = fake_tools(new, uid=0, kubectl_package=False, client_version="1:1.32.3+ds-1")
    out, apt = run_setup(new, tools)
    assert "install -y -qq kubernetes-client" in apt
    assert "installed kubernetes-client 1:1.32.3+ds-1" in out


def test_setup_as_a_user_only_says_kubectl_is_missing(tmp_path, make_available):
    tools = fake_tools(tmp_path, uid=1000, kubectl_package=True, client_version="1.32.3")
    out, apt = run_setup(tmp_path, tools)
    assert apt == ""
    assert "note: no kubectl; tests/deploy's manifest tests will skip" in out


def test_setup_leaves_an_installed_kubectl_alone(tmp_path, make_available):
    tools = fake_tools(tmp_path, uid=0, kubectl_package=True, client_version="1.32.3")
    (tools / "kubectl").symlink_to(tools / "id")  # any executable named kubectl
    out, apt = run_setup(tmp_path, tools)
    assert apt == "" and "kubectl" not in out
