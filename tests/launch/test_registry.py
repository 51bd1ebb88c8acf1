"""Launchers by `launcher.kind`: the registry, the settings each checks, and their saved form."""

from __future__ import annotations

import pytest

from megasft.errors import ConfigError
from megasft.launch.cluster import DEFAULT_WORKSPACE
from megasft.launch.local import LocalLauncher
from megasft.launch.pytorchjob import PYTORCHJOB, PyTorchJobLauncher
from megasft.launch.registry import launcher_classes, launcher_from_settings, launcher_section
from megasft.launch.trainjob import TRAINJOB, TrainJobLauncher

CLUSTER = {
    "kind": "pytorchjob",
    "namespace": "megasft",
    "nodes": 2,
    "gpus_per_node": 8,
    "gpu_resource": "amd.com/gpu",
    "workspace": "/checkpoints/runs",
    "timeout_s": 43200,
}


def test_every_launcher_is_registered_by_its_kind():
    assert launcher_classes() == {
        "local": LocalLauncher,
        "pytorchjob": PyTorchJobLauncher,
        "trainjob": TrainJobLauncher,
    }
    assert PyTorchJobLauncher.job_kind is PYTORCHJOB
    assert TrainJobLauncher.job_kind is TRAINJOB


def test_no_kind_is_the_local_launcher():
    assert launcher_from_settings({}) == LocalLauncher()
    assert launcher_from_settings({"kind": "local"}).runs_in_step


def test_a_cluster_section_becomes_its_typed_launcher_and_back():
    launcher = launcher_from_settings(CLUSTER)
    assert launcher == PyTorchJobLauncher(
        namespace="megasft", nodes=2, workspace="/checkpoints/runs", timeout_s=43200
    )
    assert not launcher.runs_in_step
    assert launcher_section(launcher) == CLUSTER  # the unset template is left out
    assert launcher_from_settings(launcher) is launcher


def test_kfp_doubles_become_whole_numbers_again():
    """KFP passes dict parameters as protobuf Structs: every number arrives as a double."""
    launcher = launcher_from_settings({**CLUSTER, "nodes": 2.0, "gpus_per_node": 8.0})
    assert (launcher.nodes, launcher.gpus_per_node) == (2, 8)
    assert isinstance(launcher.nodes, int)


def test_defaults_and_empty_values_are_the_clusters():
    launcher = launcher_from_settings({"kind": "pytorchjob", "namespace": "", "workspace": ""})
    assert (launcher.namespace, launcher.workspace) == (None, DEFAULT_WORKSPACE)
    assert (launcher.nodes, launcher.gpus_per_node, launcher.gpu_resource) == (1, 8, "amd.com/gpu")
    assert launcher_section(launcher) == {
        "kind": "pytorchjob",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu_resource": "amd.com/gpu",
        "workspace": DEFAULT_WORKSPACE,
    }


def test_local_accepts_the_settings_of_a_cluster_launcher_and_leaves_them_unused():
    """So that `--set launcher.kind=local` runs a cluster configuration on this machine."""
    launcher = launcher_from_settings({**CLUSTER, "kind": "local"})
    assert launcher == LocalLauncher()
    assert launcher_section(launcher) == {"kind": "local"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kind": "slurm"}, "launcher.kind 'slurm': use one of local, pytorchjob, trainjob"),
        (
            {"nodez": 2},
            r"launcher: unknown setting\(s\) nodez; known: claims, env, gpu_resource, gpus_per_node",
        ),
        ({"kind": "pytorchjob", "nodes": 0}, "launcher.nodes must be a whole number of at least 1"),
        ({"kind": "pytorchjob", "nodes": 1.5}, "launcher.nodes must be a whole number"),
        ({"kind": "pytorchjob", "gpus_per_node": "8"}, "launcher.gpus_per_node must be"),
        ({"kind": "pytorchjob", "namespace": "Team A"}, "launcher.namespace 'Team A' is not"),
        ({"kind": "pytorchjob", "gpu_resource": "gpu"}, "launcher.gpu_resource 'gpu' is not"),
        (
            {"kind": "pytorchjob", "workspace": "runs"},
            "launcher.workspace 'runs': give an absolute",
        ),
        ({"kind": "pytorchjob", "timeout_s": 0}, "launcher.timeout_s must be a positive number"),
        ({"kind": "pytorchjob", "template": 3}, "launcher.template 3: give the path"),
        (["pytorchjob"], "launcher: expected a mapping of settings"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(section, message):
    with pytest.raises(ConfigError, match=message):
        launcher_from_settings(section)
