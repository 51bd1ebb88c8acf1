"""The train step on a cluster: stage the inputs on the workspace volume, run a PyTorchJob,
bring the result back as the step's artifact.

KFP hands a step its input artifacts as local copies in the step's own pod; the training pods
of a PyTorchJob cannot see them. So the step copies the prepared dataset and the converted base
checkpoint to the workspace volume (`launcher.workspace`, on the megasft-checkpoints claim that
the PyTorchJob template mounts at the same path), trains there, and copies the final checkpoint,
summary.json and metrics.jsonl into its output Model artifact.

The workspace directory is named after the job, and the job's name after the KFP run and the
task, so a retried step finds its previous attempt: the staged inputs are reused, a running job
is adopted, a failed one is created again and resumes from its newest checkpoint.

Nothing here has run against a real cluster (there is none where megasft is developed); the
job it creates is checked against the PyTorchJob CRD, and the launcher's wait/log/cancel logic
against a stub of the Kubernetes API (tests/launch).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from megasft.errors import ConfigError

DEFAULT_WORKSPACE = "/checkpoints/runs"
STAGED = ".staged"  # written last: a copy without it is incomplete and is made again


def train_on_cluster(
    settings: dict[str, Any],
    launcher: dict[str, Any],
    *,
    run_id: str,
    dataset: Path,
    base_checkpoint: Path,
    output: Path,
) -> dict[str, Any]:
    """Train `settings` (TrainConfig keyword arguments) as a PyTorchJob; returns the summary."""
    from megasft.launch.pytorchjob import PyTorchJobRequest, job_name, run_pytorchjob
    from megasft.train.checkpointing import LATEST_FILE, latest_checkpoint

    name = job_name(run_id, "train")
    workspace = Path(launcher.get("workspace") or DEFAULT_WORKSPACE) / name
    nodes = int(launcher.get("nodes", 1))
    gpus = int(launcher.get("gpus_per_node", 8))
    if settings.get("nproc") not in (None, gpus):
        raise ConfigError(
            f"train.nproc {settings['nproc']} differs from launcher.gpus_per_node {gpus}; "
            "on a cluster there is one training process per GPU"
        )
    staged_data = _stage(dataset, workspace / "dataset")
    staged_base = _stage(base_checkpoint, workspace / "base")
    save = workspace / "checkpoints"
    recipe = workspace / "train.yaml"
    recipe.write_text(
        yaml.safe_dump({k: v for k, v in settings.items() if k not in ("nproc", "nodes")}),
        encoding="utf-8",
    )
    request = PyTorchJobRequest(
        name=name,
        train_args=[
            f"--config={recipe}",
            f"--data={staged_data}",
            f"--load={staged_base}",
            f"--save={save}",
        ],
        namespace=launcher.get("namespace") or _default_namespace(),
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_resource=launcher.get("gpu_resource", "amd.com/gpu"),
        labels={"megasft/run": name},
        timeout_s=launcher.get("timeout_s"),
    )
    result = run_pytorchjob(request, template=launcher.get("template"), log=sys.stdout)
    print(f"megasft train: PyTorchJob {result.name} {result.origin}, done", file=sys.stderr)

    final = latest_checkpoint(save)
    if final is None:
        raise ConfigError(f"the PyTorchJob succeeded but left no checkpoint in {save}")
    output.mkdir(parents=True, exist_ok=True)
    shutil.copytree(final, output / final.name, dirs_exist_ok=True)
    (output / LATEST_FILE).write_text((save / LATEST_FILE).read_text())
    for name in ("summary.json", "metrics.jsonl"):
        if (save / name).is_file():
            shutil.copyfile(save / name, output / name)
    return json.loads((output / "summary.json").read_text())


def _stage(source: Path, destination: Path) -> Path:
    """Copy `source` to `destination` unless a complete copy is already there."""
    if (destination / STAGED).is_file():
        return destination
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination)
    (destination / STAGED).write_text(str(source))
    return destination


def _default_namespace() -> str:
    from megasft.launch.pytorchjob import default_namespace

    return default_namespace()
