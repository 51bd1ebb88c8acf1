"""What a training run tells the world: metrics.jsonl and events.jsonl, MLflow, the progress
bar, and summary.json at the end. Rank 0 reports; on the other ranks `Reporting` holds nothing.

The files and their fields are described in megasft.train.metrics and docs/train.md.
"""

from __future__ import annotations

import json
import math
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from megasft.tracking import MetricsTracker
from megasft.train.build import uses_sequence_parallel
from megasft.train.checks import RunPlan
from megasft.train.distributed import Parallel
from megasft.train.metrics import SUMMARY_FILE, MetricsLog, Progress, model_flops, peak_tflops

if TYPE_CHECKING:  # megasft.train.run imports this module
    from megasft.train.run import LoopState, Parts

TRACKED_METRICS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_second",
    "tflops_per_device",
    "mfu",
    "skipped_steps",
    "val_loss",
    "moe_aux_loss",
    "moe_load_imbalance_max",
)
"""The fields of a metrics record that go to MLflow (metrics.jsonl has all of them)."""


@dataclass
class Reporting:
    """Rank 0's metrics log, MLflow run and progress bar; None on the other ranks, where the
    methods do nothing."""

    log: MetricsLog | None = None
    tracker: MetricsTracker | None = None
    progress: Progress | None = None
    peak_tflops: float | None = None
    """The device's dense peak, for MFU; None where unknown (CPU, fp32) and off rank 0."""

    def event(self, name: str, step: int, **details: Any) -> None:
        """A line of events.jsonl."""
        if self.log is not None:
            self.log.event(name, step, **details)

    def note(self, message: str) -> None:
        """A line printed above the progress bar."""
        if self.progress is not None:
            self.progress.note(message)


def open_reporting(
    plan: RunPlan, parallel: Parallel, *, step: int, resumed_from: str | None
) -> Reporting:
    """Start reporting at `step`: a fresh metrics log, or the resumed run's cut back to its
    checkpoint; the MLflow run with the settings as parameters; the progress bar.

    Args:
        plan: the checked run (--save, tracking settings, train_iters, precision).
        parallel: this rank's place; only rank 0 reports.
        step: the step the loop starts after (0, or the resumed checkpoint's).
        resumed_from: the checkpoint the run resumes, or None.

    Returns:
        The run's Reporting (empty off rank 0).
    """
    if not parallel.is_main:
        return Reporting()
    config = plan.config
    save = Path(config.save)
    log = MetricsLog(save)
    if resumed_from:
        log.resume_at(step, resumed_from)
        print(f"megasft train: resuming from {resumed_from} (step {step})", flush=True)
    else:
        log.start_fresh()
    if uses_sequence_parallel(config, parallel, plan.architecture):
        print(
            f"megasft train: sequence parallelism on (TP {config.tensor_parallel}): norms, "
            "residuals and dropout run on 1/TP of each sequence",
            flush=True,
        )
    tracker = MetricsTracker(config.tracking_uri, config.experiment, save.name)
    tracker.log_params(asdict(config))
    progress = Progress(True, total=config.train_iters, initial=step)
    peak = None
    if parallel.on_accelerator:
        peak = peak_tflops(torch.cuda.get_device_name(), config.precision)
    return Reporting(log=log, tracker=tracker, progress=progress, peak_tflops=peak)


def step_record(
    parts: Parts,
    state: LoopState,
    loss: float,
    grad_norm: float,
    *,
    skipped: bool,
    spike: bool,
    seconds: float,
) -> dict[str, Any]:
    """The metrics record of the step just done (`state.step`), and its throughput added to
    the run's totals. Tokens and FLOPs are counted on rank 0, from the global batch's rows.
    """
    config = parts.config
    record: dict[str, Any] = {
        "step": state.step,
        "epoch": round(state.step * config.global_batch_size / parts.plan.train_rows, 4),
        "loss": loss,
        "lr": parts.optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "step_seconds": round(seconds, 4),
        "skipped": skipped,
        "skipped_steps": state.monitor.skipped_steps,
        "spike": spike,
    }
    if parts.parallel.is_main:
        # The documents of the whole global batch, from the memory-mapped table.
        indices = parts.data.sampler.global_batch(state.step - 1)
        lengths = (
            parts.data.train.take(pa.array(indices, type=pa.int64()))
            .column("seq_lengths")
            .combine_chunks()
            .flatten()
            .to_numpy()
        )
        tokens = int(lengths.sum())
        flops = model_flops(parts.architecture, lengths.tolist())
        tflops = flops / seconds / parts.parallel.world_size / 1e12
        peak = parts.reporting.peak_tflops
        record.update(
            tokens=tokens,
            tokens_per_second=round(tokens / seconds, 1),
            tflops_per_device=round(tflops, 4),
            mfu=round(tflops / peak, 4) if peak else None,
        )
        state.totals["tokens"] += tokens
        state.totals["flops"] += flops
    state.totals["seconds"] += seconds
    state.totals["steps"] += 1
    return record


def report(parts: Parts, record: dict[str, Any]) -> None:
    """The step's record to metrics.jsonl and MLflow (every log_interval steps, and on the
    steps worth a look), and the progress bar. A non-finite loss has its event instead."""
    reporting = parts.reporting
    if reporting.log is None:
        return
    config = parts.config
    step = record["step"]
    wanted = (
        step % config.log_interval == 0
        or record["skipped"]
        or record["spike"]
        or "val_loss" in record
        or step == config.train_iters
    )
    if wanted and math.isfinite(record["loss"]):
        reporting.log.write(record)
        reporting.tracker.log_metrics({key: record.get(key) for key in TRACKED_METRICS}, step=step)
    reporting.progress.update(record["loss"], record["lr"], record.get("tokens_per_second", 0.0))


def finish(parts: Parts, state: LoopState, status: str) -> dict[str, Any]:
    """The run's summary, written to summary.json by rank 0, which also closes the progress
    bar and the MLflow run.

    Args:
        parts: the run's settings and reporting.
        state: the loop's state at the end.
        status: "completed", "preempted" or "stopped".

    Returns:
        The summary (on rank 0 with non-finite figures as None and a `tracking` entry).
    """
    from megasft.train.checkpointing import iteration_name

    config = parts.config
    totals = state.totals
    peak = parts.reporting.peak_tflops
    seconds = totals["seconds"] or math.nan
    tflops = totals["flops"] / seconds / parts.parallel.world_size / 1e12
    summary = {
        "status": status,
        "steps": state.step,
        "train_iters": config.train_iters,
        "final_loss": state.last_loss,
        "final_val_loss": state.last_val_loss,
        "skipped_steps": state.monitor.skipped_steps,
        "loss_spikes": state.monitor.spikes,
        "tokens": int(totals["tokens"]),
        "target_tokens": int(totals["target_tokens"]),
        "train_seconds": round(totals["seconds"], 3),
        "tokens_per_second": round(totals["tokens"] / seconds, 1),
        "tflops_per_device": round(tflops, 4),
        "mfu": round(tflops / peak, 4) if peak else None,
        "checkpoint": str(Path(config.save) / iteration_name(state.last_saved_step))
        if state.last_saved_step is not None
        else None,
        "resumed_from": state.resumed_from,
        "world_size": parts.parallel.world_size,
        "sequence_parallel": uses_sequence_parallel(
            config, parts.parallel, parts.plan.architecture
        ),
        # this rank's most allocated at once, to hold against `megasft plan`
        "peak_memory_bytes": torch.cuda.max_memory_allocated()
        if parts.parallel.on_accelerator
        else None,
        "host": socket.gethostname(),
        "config": asdict(config),
    }
    reporting = parts.reporting
    if reporting.log is not None:
        reporting.progress.close()
        reporting.tracker.finish(status)
        summary["tracking"] = reporting.tracker.summary()
        summary = {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in summary.items()
        }
        (Path(config.save) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
