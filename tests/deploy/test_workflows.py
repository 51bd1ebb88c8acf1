"""The CI workflow files parse, pin their actions, and run only what the Makefile or the CLI has."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO
from tests.deploy.commands import commands, makefile_targets, unknown_commands

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_workflow_parses_and_is_least_privileged(path):
    workflow = yaml.safe_load(path.read_text())
    assert workflow.get(True) or workflow.get("on"), (
        "no trigger (`on:`)"
    )  # YAML 1.1 reads on: as True
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert job["runs-on"] and job["steps"] and job["timeout-minutes"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_actions_are_pinned_by_commit(path):
    for step in steps(yaml.safe_load(path.read_text())):
        if "uses" in step:
            assert PINNED_ACTION.match(step["uses"]), f"{step['uses']} is not pinned by commit"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_every_command_is_a_makefile_target_or_a_megasft_subcommand(path):
    targets = makefile_targets()
    for step in steps(yaml.safe_load(path.read_text())):
        if "run" in step:
            assert not unknown_commands(step["run"], targets, None), step["run"]
            for words in commands(step["run"]):
                if words[0] == "make":  # make itself agrees the target exists (nothing runs)
                    dry_run = subprocess.run(
                        ["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True
                    )
                    assert dry_run.returncode == 0, dry_run.stderr


def test_ci_runs_the_readme_test_command():
    workflow = yaml.safe_load((REPO / ".github/workflows/ci.yml").read_text())
    assert ["make", "test"] in [
        words for step in steps(workflow) for words in commands(step.get("run", ""))
    ]


def test_the_command_check_itself():
    script = "make lint test\nFOO=1 make -j2 bench \\\n  && megasft pipeline submit --host x\nkubectl get pods | grep x"
    assert commands(script)[0] == ["make", "lint", "test"]
    assert unknown_commands(script, {"lint", "test", "bench"}, {"prepare", "train"}) == [
        "megasft pipeline",
        "kubectl",
        "grep",
    ]
    assert makefile_targets() >= {"setup", "test", "lint", "demo", "images"}
