"""The train step on a cluster, for any job kind: stage the inputs on the workspace volume, run
the job, bring the result back as the step's artifact.

KFP hands a step its input artifacts as local copies in the step's own pod, which the training
pods cannot see. So the step copies the dataset and the base checkpoint to the workspace volume
(`launcher.workspace`, on the claim the job template mounts at the same path), trains there, and
copies the final checkpoint, summary.json and metrics.jsonl into its output. The workspace is
named after the job, the job after the run and the task: a retried step reuses the staged
inputs and finds its earlier attempt's job. A job kind's launcher subclasses `ClusterLauncher`;
`render(plan)` builds the job the step would create, without staging or a cluster.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import yaml

from megasft.errors import ConfigError
from megasft.launch.job_api import JobKind, load_template
from megasft.launch.job_request import DNS_1123_LABEL, GPU_RESOURCE, JobRequest, job_name
from megasft.launch.registry import Layout, TrainingPlan, check_layout
from megasft.settings import setting

DEFAULT_WORKSPACE = "/checkpoints/runs"
STAGED = ".staged"  # written last: a copy without it is incomplete and is made again
RECIPE = "train.yaml"  # the run's train settings, beside the staged inputs


@dataclass(frozen=True)
class ClusterLauncher:
    """Training as a job on the cluster; the settings every job kind shares."""

    job_kind: ClassVar[JobKind]
    """The kind of job this launcher creates (set by each subclass)."""
    runs_in_step: ClassVar[bool] = False
    poll_s: ClassVar[float] = 10.0
    """Seconds between two polls of the job."""

    namespace: str | None = setting(
        None, "Where the job runs; None: the launching pod's namespace (see `default_namespace`)."
    )
    nodes: int = setting(1, "Nodes (pods) of the job.")
    gpus_per_node: int = setting(8, "GPUs, and training processes, per node.")
    gpu_resource: str = setting(
        "amd.com/gpu", "The device plugin's resource name: `amd.com/gpu` or `nvidia.com/gpu`."
    )
    template: str | None = setting(
        None, "A YAML file holding the job template; None: the template in the cluster."
    )
    workspace: str = setting(
        DEFAULT_WORKSPACE,
        "The directory on the checkpoint volume where each run stages its inputs and trains.",
    )
    timeout_s: float | None = setting(
        None, "Seconds until the job is deleted and the step fails; None: no limit of ours."
    )
    image: str | None = setting(
        None,
        "The training image; None: the one the cluster's manifests set (the PyTorchJob "
        "template's, the training runtime's).",
    )

    def __post_init__(self) -> None:
        # An empty value is an unset one, as it always was for these two.
        if self.namespace == "":
            object.__setattr__(self, "namespace", None)
        if self.workspace == "":
            object.__setattr__(self, "workspace", DEFAULT_WORKSPACE)
        if self.namespace is not None and not (
            isinstance(self.namespace, str)
            and DNS_1123_LABEL.fullmatch(self.namespace)
            and len(self.namespace) <= 63
        ):
            raise ConfigError(
                f"launcher.namespace {self.namespace!r} is not a valid namespace name"
            )
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"launcher.{name} must be a whole number of at least 1, got {value!r}"
                )
        if not isinstance(self.gpu_resource, str) or not GPU_RESOURCE.fullmatch(self.gpu_resource):
            raise ConfigError(
                f"launcher.gpu_resource {self.gpu_resource!r} is not an extended resource name "
                "such as amd.com/gpu or nvidia.com/gpu"
            )
        if self.template is not None and not isinstance(self.template, str):
            raise ConfigError(f"launcher.template {self.template!r}: give the path of a YAML file")
        if not isinstance(self.workspace, str) or not PurePosixPath(self.workspace).is_absolute():
            raise ConfigError(
                f"launcher.workspace {self.workspace!r}: give an absolute directory on the "
                f"checkpoint volume (default {DEFAULT_WORKSPACE})"
            )
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or self.timeout_s <= 0
        ):
            raise ConfigError(
                f"launcher.timeout_s must be a positive number, got {self.timeout_s!r}"
            )
        if self.image is not None and not (isinstance(self.image, str) and self.image.strip()):
            raise ConfigError(
                f"launcher.image {self.image!r}: give an image reference or leave it out"
            )

    def layout(self, settings: Mapping[str, Any]) -> Layout:
        """`gpus_per_node` training processes on each of `nodes` nodes, whatever `settings` say."""
        return Layout(self.gpus_per_node, self.nodes, "launcher.gpus_per_node", "launcher.nodes")

    def job_template(self) -> Mapping[str, Any] | str | None:
        """What the job is built from: the `template` file, None for the cluster's template."""
        return self.template

    def job_request(self, plan: TrainingPlan) -> JobRequest:
        """The request for `plan`'s job: its name, its flags (on the staged inputs), its size.

        Raises:
            ConfigError: for train settings that do not fit the launcher's nodes and GPUs.
        """
        settings = check_layout(self, plan.settings)
        name = job_name(plan.run_id, "train")
        workspace = Path(self.workspace) / name
        return JobRequest(
            name=name,
            train_args=[
                f"--config={workspace / RECIPE}",
                f"--data={workspace / 'dataset'}",
                f"--load={workspace / 'base'}",
                f"--save={workspace / 'checkpoints'}",
            ],
            nodes=settings["nodes"],
            gpus_per_node=settings["nproc"],
            gpu_resource=self.gpu_resource,
            image=self.image,
            labels={"megasft/run": name},
            timeout_s=self.timeout_s,
            **({"namespace": self.namespace} if self.namespace else {}),
        )

    def render(self, plan: TrainingPlan) -> dict:
        """The job that `run(plan)` would create, built here: nothing is staged or called.

        Raises:
            ConfigError: for settings that do not fit, or when the job's template is the
                cluster's (`template` unset), which only a cluster can give.
        """
        template = self.job_template()
        if template is None:
            raise ConfigError(
                f"the {self.job_kind.kind} is built from the template in the cluster; to build it "
                "here, give the template as a file: --set launcher.template=FILE (e.g. the "
                "output of `kubectl kustomize` of your overlay)"
            )
        if not isinstance(template, Mapping):
            template = load_template(self.job_kind, template)
        return self.job_kind.build(template, self.job_request(plan))

    def run(self, plan: TrainingPlan) -> dict[str, Any]:
        """Trains `plan` as a job of `job_kind`, resuming an earlier attempt's.

        Args:
            plan: the run; `plan.settings["nproc"]`, when set, must equal `gpus_per_node`.

        Returns:
            The training summary, also copied with the final checkpoint to `plan.output`.

        Raises:
            ConfigError: for settings that do not fit, or a job that left no checkpoint.
            JobError: when the job fails, times out or is cancelled.
        """
        from megasft.launch.job_run import run_job
        from megasft.train.checkpointing import LATEST_FILE, latest_checkpoint

        kind = self.job_kind
        request = self.job_request(plan)
        workspace = Path(self.workspace) / request.name
        _stage(plan.dataset, workspace / "dataset")
        _stage(plan.base_checkpoint, workspace / "base")
        save = workspace / "checkpoints"
        (workspace / RECIPE).write_text(
            yaml.safe_dump({k: v for k, v in plan.settings.items() if k not in ("nproc", "nodes")}),
            encoding="utf-8",
        )
        template = self.job_template()
        result = run_job(kind, request, template=template, poll_s=self.poll_s, log=sys.stdout)
        print(f"megasft train: {kind.kind} {result.name} {result.origin}, done", file=sys.stderr)

        final = latest_checkpoint(save)
        if final is None:
            raise ConfigError(f"the {kind.kind} succeeded but left no checkpoint in {save}")
        output = plan.output
        output.mkdir(parents=True, exist_ok=True)
        shutil.copytree(final, output / final.name, dirs_exist_ok=True)
        (output / LATEST_FILE).write_text((save / LATEST_FILE).read_text())
        for file in ("summary.json", "metrics.jsonl"):
            if (save / file).is_file():
                shutil.copyfile(save / file, output / file)
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
