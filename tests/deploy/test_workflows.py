"""The CI workflow files parse, pin their actions, and run only what the Makefile or the CLI has."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from tests.conftest import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", line)
        if match and not line.startswith(("\t", ".PHONY")):
            targets.update(match.group(1).split())
    return targets


def commands(script: str) -> list[list[str]]:
    """The simple commands of a `run:` script: lines joined at backslashes, split at && || ; |."""
    joined = re.sub(r"\\\n", " ", script)
    found = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part)
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]  # VAR=value before the command
            if words:
                found.append(words)
    return found


def unknown_commands(script: str, targets: set[str], subcommands: set[str] | None) -> list[str]:
    """Commands that are neither `make TARGET...` with known targets nor `megasft SUBCOMMAND`."""
    unknown = []
    for words in commands(script):
        if words[0] == "make":
            names = [word for word in words[1:] if not word.startswith("-") and "=" not in word]
            unknown += [f"make {name}" for name in names if name not in targets]
        elif words[0] == "megasft":
            if subcommands is None:
                from megasft.cli import build_parser

                # argparse has no public way to list subcommands; its subparsers action holds them.
                (action,) = [
                    a
                    for a in build_parser()._actions
                    if hasattr(a, "choices") and a.dest == "command"
                ]
                subcommands = set(action.choices)
            if len(words) < 2 or words[1] not in subcommands:
                unknown.append(" ".join(words[:2]))
        else:
            unknown.append(words[0])
    return unknown


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
