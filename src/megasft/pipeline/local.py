"""`megasft pipeline run-local`: the whole pipeline on this machine with kfp.local.

kfp.local's SubprocessRunner runs each component as a subprocess of this Python (the same
environment, nothing pip-installed), wiring artifacts through directories under
WORKDIR/kfp. Training runs inside its step through torchrun, as `launcher.kind: local` says;
on a machine without GPUs that is the megatron-core CPU emulation over gloo.

MLflow: a `sqlite:///...` tracking URI is an embedded store: no server, a database file and an
artifact directory (WORKDIR/mlartifacts) beside it; `mlflow ui --backend-store-uri URI` opens it.
Quiet runs print one line per step and file each step's output under WORKDIR/logs (progress.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megasft.errors import ConfigError
from megasft.pipeline.config import PipelineConfig, check_inputs
from megasft.pipeline.progress import StepLogs
from megasft.pipeline.steps.common import PIPELINE_NAME, experiment_name

# Per step, the output artifact whose metadata holds its key figures, and which of them a quiet
# run's progress line shows. kfp.local names a second use of a component NAME-2 (the export is
# checkpoint-convert-2), so a numbered name finds its component's entry.
STEP_FIGURES = {
    "validate": ("plan", ("config",)),
    "checkpoint-convert": ("output", ("family", "layers", "format")),
    "tokenize-and-mask": ("dataset", ("examples", "tokens", "packing_efficiency")),
    "train": ("checkpoints", ("steps", "final_loss", "final_val_loss")),
    "evaluate": ("report", ("accuracy", "base_accuracy", "val_loss")),
    "register": ("record", ("registered_model", "version")),
}


@dataclass
class LocalRun:
    """What a local pipeline run did."""

    succeeded: bool
    run_directory: Path | None
    """WORKDIR/kfp/<run>: one directory per step with its outputs and executor_output.json."""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per step (by its task name): `metadata` per output artifact and `parameters` returned."""
    seconds: float = 0.0
    error: str | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    """A quiet run's log file per step (and `pipeline` for the rest); empty otherwise."""

    def metadata(self, task: str, artifact: str) -> dict[str, Any]:
        return self.tasks.get(task, {}).get("metadata", {}).get(artifact, {})


def run_local(
    config: PipelineConfig, *, workdir: str | Path = "pipeline-output", quiet: bool = False
) -> LocalRun:
    """Run the pipeline for `config` with kfp.local; print a summary; return what happened.

    Relative paths in the configuration are taken from the current directory. Bad settings
    and missing inputs fail here, before anything starts (and again in the validate step).

    Args:
        config: the run configuration; `launcher.kind` must be `local`.
        workdir: where the artifacts (WORKDIR/kfp), logs and an embedded MLflow store go.
        quiet: print one line as each step starts and ends instead of everything the steps
            and kfp.local print; each step's full output goes to WORKDIR/logs/STEP.log.

    Returns:
        What happened: success, the run directory, each step's outputs, the log files.

    Raises:
        ConfigError: the launcher is not local, or a setting is invalid.
        InputError: an input (data, model) is missing.
    """
    from kfp import local

    from megasft.pipeline.sources import sft_pipeline

    if not config.launcher.runs_in_step:
        raise ConfigError(
            f"config {config.name}: launcher.kind is {config.launcher.kind}; run-local trains "
            "on this machine: add --set launcher.kind=local (and point data.path and model.path "
            "at local files)"
        )
    workdir = Path(workdir).resolve()
    config = config.with_paths_resolved(Path.cwd())
    check_inputs(config)
    workdir.mkdir(parents=True, exist_ok=True)
    uri = config.tracking.uri
    if uri and uri.startswith("sqlite:"):
        _create_experiment(uri, experiment_name(config), workdir / "mlartifacts")

    # kfp.local warns that the components name a container image it will not use (it runs them
    # in this Python, which is the point) and that display names have no effect locally.
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    root = workdir / "kfp"
    before = set(root.glob("*")) if root.exists() else set()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=False,
    )
    started = time.monotonic()
    print(
        f"megasft pipeline: running {PIPELINE_NAME} ({config.name}) locally; artifacts in {root}",
        file=sys.stderr,
    )
    error = None
    logs = None
    if quiet:
        logs = StepLogs(workdir / "logs", sys.stderr, lambda task: step_figures(root, before, task))
    try:
        # kfp.local prints the steps' output and its own log on sys.stdout, whichever it is.
        with contextlib.redirect_stdout(logs) if logs else contextlib.nullcontext():
            sft_pipeline()(**config.arguments())
    except Exception as failure:  # kfp.local raises RuntimeError for a failed task
        error = str(failure)
    finally:
        if logs:
            logs.close()
    run_directory = _newest_run(root, before)
    result = LocalRun(
        succeeded=False,
        run_directory=run_directory,
        tasks=read_task_outputs(run_directory) if run_directory else {},
        seconds=time.monotonic() - started,
        error=error,
        logs=logs.files if logs else {},
    )
    # kfp.local reports a failed task by logging, not by raising (raise_on_error=False): a step
    # that did not leave its outputs behind did not succeed.
    result.succeeded = error is None and "evaluate" in result.tasks
    print(summarize(result, config), file=sys.stderr)
    return result


def _newest_run(root: Path, before: set[Path]) -> Path | None:
    """The run directory kfp.local made under `root` since `before` was listed."""
    new_runs = sorted(set(root.glob("*")) - before, key=lambda p: p.stat().st_mtime)
    return new_runs[-1] if new_runs else None


def read_task_outputs(run_directory: Path) -> dict[str, dict[str, Any]]:
    """Each finished step's output metadata and returned parameters, from the executor
    output files kfp.local leaves in the step's directory."""
    return {
        path.parent.name: _task_output(path)
        for path in sorted(run_directory.glob("*/executor_output.json"))
    }


def _task_output(path: Path) -> dict[str, Any]:
    output = json.loads(path.read_text(encoding="utf-8"))
    metadata = {
        name: (entry.get("artifacts") or [{}])[0].get("metadata", {})
        for name, entry in output.get("artifacts", {}).items()
    }
    return {"metadata": metadata, "parameters": output.get("parameterValues", {})}


def step_figures(root: Path, before: set[Path], task: str) -> str:
    """The key figures of a finished step, for its progress line ("" when it has none).

    Args:
        root: WORKDIR/kfp; the run is the directory kfp.local made there since `before`.
        before: what `root` held before this run.
        task: the step's task name, e.g. `train` or `checkpoint-convert-2`.

    Returns:
        e.g. "steps 200, final_loss 0.4123, final_val_loss 0.4511".
    """
    artifact, keys = STEP_FIGURES.get(re.sub(r"-\d+$", "", task), ("", ()))
    run_directory = _newest_run(root, before)
    path = run_directory / task / "executor_output.json" if run_directory else None
    if not keys or path is None or not path.is_file():
        return ""
    metadata = _task_output(path)["metadata"].get(artifact, {})
    return ", ".join(f"{key} {_figure(metadata[key])}" for key in keys if key in metadata)


def _figure(value: Any) -> str:
    if isinstance(value, float):  # KFP stores every number of the metadata as a double
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def summarize(result: LocalRun, config: PipelineConfig) -> str:
    lines = [
        f"megasft pipeline: {config.name} {'succeeded' if result.succeeded else 'FAILED'} "
        f"in {result.seconds / 60:.1f} min"
    ]
    if result.error:
        lines.append(f"  error: {result.error}")
    dataset = result.metadata("tokenize-and-mask", "dataset")
    if dataset:
        lines.append(
            f"  data: {dataset.get('examples')} examples, {dataset.get('tokens')} tokens, "
            f"packing efficiency {dataset.get('packing_efficiency', 0):.1%}"
        )
    trained = result.metadata("train", "checkpoints")
    if trained:
        lines.append(
            f"  train: {trained.get('steps')} steps, final loss {trained.get('final_loss', 0):.3f}"
        )
    report = result.metadata("evaluate", "report")
    if report:
        if "accuracy" in report:
            lines.append(
                f"  evaluate: base accuracy {report.get('base_accuracy', 0):.2f} -> tuned "
                f"accuracy {report['accuracy']:.2f}"
            )
        if "val_loss" in report:
            lines.append(
                f"  validation loss: {report.get('base_val_loss', 0):.3f} -> "
                f"{report['val_loss']:.3f}"
            )
        lines.append(f"  gate: {report.get('gate')}")
        if result.run_directory:
            lines.append(f"  report: file://{result.run_directory / 'evaluate' / 'report'}")
    registered = result.metadata("register", "record")
    if registered.get("version"):
        lines.append(
            f"  registered: {registered['registered_model']} version {registered['version']}"
        )
    if result.logs:
        directory = next(iter(result.logs.values())).parent
        names = ", ".join(path.name for path in result.logs.values())
        lines.append(f"  logs: {directory}/ ({names})")
    uri = config.tracking.uri
    if uri:
        lines.append(
            f"  MLflow: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
        )
    return "\n".join(lines)


def _create_experiment(uri: str, name: str, artifacts: Path) -> None:
    """An embedded store keeps its artifacts beside it, not in ./mlruns of each step's cwd."""
    from megasft import tracking

    tracking.ensure_experiment(uri, name, artifact_location=artifacts.as_uri())
