"""The SFT recipe on megatron-core: setup, train, cleanup, read top to bottom.

    setup    the process groups, the model (its weights from --load, or the newest checkpoint
             in --save to resume), megatron-core's DDP wrapper, optimizer and LR schedule
    train    per step: the micro-batches of this data-parallel rank through megatron-core's
             pipeline schedule (`step.forward_step` / `step.loss_func`), the global loss,
             the NaN/Inf check, the optimizer step; then metrics, validation, checkpoints
    cleanup  the final checkpoint, summary.json, the process groups

Called on every rank (`megasft.train.worker` under torchrun, or in-process for one process).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from megasft.data.store import open_split
from megasft.errors import MegasftError
from megasft.megatron.architecture import ModelArchitecture
from megasft.tracking import MetricsTracker
from megasft.train.checks import RunPlan, plan_run
from megasft.train.config import TrainConfig
from megasft.train.data import MicroBatch, StepSampler, collate
from megasft.train.distributed import Parallel, setup_parallel, teardown_parallel
from megasft.train.metrics import (
    SUMMARY_FILE,
    MetricsLog,
    Progress,
    StabilityMonitor,
    model_flops,
    peak_tflops,
)
from megasft.train.step import ModelInputs, bshd_inputs, forward_step, thd_inputs

PAD_ID = 0
"""Token id of padding positions. Any id works: padding is never a target and sits in its own
attention block."""
INJECT_NAN_ENV = "MEGASFT_INJECT_NAN_STEPS"
"""Fault injection for tests: comma-separated step numbers (1-based) whose loss is made NaN."""


class TrainingStopped(MegasftError):
    """The run stopped on purpose: non-finite steps, by policy or too many in a row."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written and the run should exit."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"stopped by SIGTERM; checkpoint {checkpoint} written")
        self.checkpoint = checkpoint
        self.summary: dict[str, Any] = {}


@dataclass
class Run:
    """Everything `setup` builds and the loop uses."""

    plan: RunPlan
    parallel: Parallel
    model: list[torch.nn.Module]
    """Model chunks of this pipeline stage (one, or one per virtual stage), DDP-wrapped."""
    optimizer: Any
    scheduler: Any
    sampler: StepSampler
    train_table: pa.Table
    val_table: pa.Table | None
    thd: bool
    """The packed (Transformer Engine) layout instead of rows with a mask."""
    step: int = 0
    """Optimizer steps completed."""
    monitor: StabilityMonitor = field(default_factory=lambda: StabilityMonitor(3.0))
    metrics: MetricsLog | None = None
    tracker: MetricsTracker | None = None
    progress: Progress | None = None
    nan_steps: frozenset[int] = frozenset()
    peak: float | None = None
    totals: dict[str, float] = field(default_factory=dict)
    last_val_loss: float | None = None
    last_loss: float | None = None
    last_saved_step: int | None = None
    resumed_from: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    """What fixes the data order; a resumed run must match it (see checkpointing)."""
    sigterm_received: bool = False
    """A SIGTERM arrived; the run stops after the step in progress."""

    @property
    def config(self) -> TrainConfig:
        return self.plan.config

    @property
    def architecture(self) -> ModelArchitecture:
        return self.plan.architecture


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `config`; returns the summary.

    Raises Preempted after a SIGTERM was handled, TrainingStopped for an unstable run, and
    ConfigError / InputError for settings or inputs that cannot work.
    """
    from megasft.megatron.cpu import accelerator_present

    plan = plan_run(config, on_accelerator=accelerator_present())
    parallel = setup_parallel(plan.config)
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        run = setup(plan, parallel)

        def on_sigterm(signum, frame):
            run.sigterm_received = True  # acted on at the end of the step, by every rank at once

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            status = train_loop(run)
        except Preempted as stopped:
            stopped.summary = finish(run, "preempted")
            raise
        return finish(run, status)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        teardown_parallel(parallel)


# --- setup ------------------------------------------------------------------------------------


def setup(plan: RunPlan, parallel: Parallel) -> Run:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megasft.megatron.builder import (
        build_model,
        transformer_config,
        transformer_engine_available,
    )
    from megasft.megatron.weights import load_weights
    from megasft.train.checkpointing import (
        check_resumable,
        load_checkpoint,
        remove_partial_checkpoints,
    )

    config = plan.config
    save = Path(config.save)
    if parallel.is_main:
        save.mkdir(parents=True, exist_ok=True)
        (save / "config.yaml").write_text(config.to_yaml())
        remove_partial_checkpoints(save)  # left by a run killed while saving
    thd = transformer_engine_available()
    bf16 = config.precision == "bf16"
    distributed_optimizer = (
        parallel.on_accelerator
        if config.distributed_optimizer is None
        else config.distributed_optimizer
    )
    model_config = transformer_config(
        plan.architecture,
        tensor_parallel_size=config.tensor_parallel,
        pipeline_parallel_size=config.pipeline_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Every weight is then loaded, but megatron-core marks tensor-parallel weights (the
        # attribute its gradient norm and clipping read) only while initialising them.
        perform_initialization=True,
        overrides=dict(
            context_parallel_size=config.context_parallel,
            virtual_pipeline_model_parallel_size=config.virtual_pipeline_stages,
            sequence_parallel=parallel.on_accelerator and config.tensor_parallel > 1,
            # loss_func returns (sum, count): megatron-core divides the gradients by the
            # number of target tokens of the whole global batch (see step.py)
            calculate_per_token_loss=True,
            # Transformer Engine accumulates weight gradients into main_grad directly
            gradient_accumulation_fusion=thd,
            # Frees a stage's output once sent, keeping only what backward needs. Not on
            # CPU: gloo may still be reading the freed memory of an asynchronous send.
            deallocate_pipeline_outputs=parallel.on_accelerator,
            # The interleaved schedule with separate, overlapped sends and receives (as
            # Megatron-LM runs it): the batched form posts two messages to the same peer at
            # PP=2 (its previous and next stage), which gloo matches the wrong way round.
            overlap_p2p_comm=bool(config.virtual_pipeline_stages),
            batch_p2p_comm=not config.virtual_pipeline_stages,
        ),
    )
    chunks = [
        build_model(
            plan.architecture,
            model_config,
            vp_stage=stage if config.virtual_pipeline_stages else None,
        ).to(parallel.device)
        for stage in range(config.virtual_pipeline_stages or 1)
    ]
    if bf16:
        for chunk in chunks:
            # megatron-core's local norms (the CPU spec) keep fp32 weights in a bf16 model,
            # which its bf16 optimizer cannot checkpoint; Megatron-LM casts every parameter
            # (its Float16Module). Buffers, such as the RoPE frequencies, stay as they are.
            for parameter in chunk.parameters():
                if parameter.dtype == torch.float32:
                    parameter.data = parameter.data.to(torch.bfloat16)
    if plan.resume_from is None:  # weights only: a fine-tuning start
        load_weights(chunks, Path(config.load))

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.on_accelerator,
        use_distributed_optimizer=distributed_optimizer,
    )
    model = [
        DistributedDataParallel(model_config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    model_config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if ddp_config.overlap_grad_reduce and len(model) > 1:
        model_config.grad_sync_func = [m.start_grad_sync for m in model]
    model_config.finalize_model_grads_func = finalize_model_grads

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=config.lr,
            min_lr=config.min_lr,
            # AdamW; megatron-core puts norms (1-D weights) and biases in a group without decay
            weight_decay=config.weight_decay,
            adam_beta1=config.adam_beta1,
            adam_beta2=config.adam_beta2,
            adam_eps=config.adam_eps,
            clip_grad=config.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=distributed_optimizer,
        ),
        model,
    )
    # Linear warmup from 0, then cosine to min_lr at the last step. Step s (0-based) trains
    # at the rate for s + 1, so that the first step does not waste a batch at rate 0.
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.warmup_iters,
        lr_decay_steps=config.train_iters,
        lr_decay_style="cosine",
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=config.train_iters,
        wd_incr_style="constant",
    )

    run = Run(
        plan=plan,
        parallel=parallel,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=StepSampler(
            rows=plan.train_rows,
            global_batch_size=config.global_batch_size,
            micro_batch_size=config.micro_batch_size,
            data_parallel_size=parallel.data_size,
            data_parallel_rank=parallel.data_rank,
            seed=config.seed,
        ),
        train_table=open_split(config.data, "train"),
        val_table=open_split(config.data, "val") if plan.val_rows else None,
        thd=thd,
        monitor=StabilityMonitor(config.spike_factor),
        nan_steps=_injected_nan_steps(),
        totals={"tokens": 0, "target_tokens": 0, "flops": 0.0, "seconds": 0.0, "steps": 0},
    )
    identity = {
        "global_batch_size": config.global_batch_size,
        "seed": config.seed,
        "data_fingerprint": plan.data_fingerprint,
    }
    if plan.resume_from is not None:
        check_resumable(plan.resume_from, identity)
        state = load_checkpoint(plan.resume_from, model, optimizer, world_size=parallel.world_size)
        run.step = state["step"]
        run.monitor.restore(state["monitor"])
        run.totals = state["totals"]
        run.last_val_loss = state.get("last_val_loss")
        run.last_saved_step = run.step
        run.resumed_from = str(plan.resume_from)
    scheduler.num_steps = run.step

    if parallel.is_main:
        run.metrics = MetricsLog(save)
        if run.resumed_from:
            run.metrics.resume_at(run.step, run.resumed_from)
            print(f"megasft train: resuming from {run.resumed_from} (step {run.step})", flush=True)
        else:
            run.metrics.start_fresh()
        run.tracker = MetricsTracker(config.tracking_uri, config.experiment, save.name)
        run.tracker.log_params(asdict(config))
        run.progress = Progress(True, total=config.train_iters, initial=run.step)
        if parallel.on_accelerator:
            run.peak = peak_tflops(torch.cuda.get_device_name(), config.precision)
    run.identity = identity
    return run


def _injected_nan_steps() -> frozenset[int]:
    value = os.environ.get(INJECT_NAN_ENV, "")
    return frozenset(int(step) for step in value.split(",") if step.strip())


# --- train --------------------------------------------------------------------------------------


def train_loop(run: Run) -> str:
    """Steps until train_iters; returns the final status. Raises Preempted on SIGTERM."""
    config = run.config
    while run.step < config.train_iters:
        record, stop = train_step(run)
        last = run.step == config.train_iters
        if (config.eval_interval and run.step % config.eval_interval == 0) or (
            last and run.val_table is not None
        ):
            record.update(evaluate(run))
        _report(run, record)
        if stop:  # SIGTERM: save where we are and leave
            checkpoint = save(run)
            if run.parallel.is_main:
                run.metrics.event("preempted", run.step, checkpoint=str(checkpoint))
            raise Preempted(checkpoint)
        if config.save_interval and run.step % config.save_interval == 0:
            save(run)
    if run.last_saved_step != run.step:
        save(run)
    return "completed"


def train_step(run: Run) -> tuple[dict[str, Any], bool]:
    """One optimizer step over a global batch; returns its metrics record and whether a
    SIGTERM asks the run to stop."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = run.config
    started = time.perf_counter()
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    run.scheduler.step(1)  # the rate of this step: see setup()

    batch_indices = run.sampler.micro_batches(run.step)
    make_inputs = partial(_model_inputs, run, run.train_table)
    forward_backward = get_forward_backward_func()
    reported = forward_backward(
        forward_step_func=partial(
            forward_step,
            vocab_size=run.architecture.vocab_size,
            inject_nan=(run.step + 1) in run.nan_steps,
        ),
        data_iterator=_data_iterators(run, make_inputs, batch_indices),
        model=run.model if len(run.model) > 1 else run.model[0],
        num_microbatches=len(batch_indices),
        seq_length=_sequence_length(run),
        micro_batch_size=1 if run.thd else config.micro_batch_size,
        forward_only=False,
    )
    loss_sum, target_tokens, stop = _global_loss(run, reported)
    loss = loss_sum / target_tokens if target_tokens else 0.0

    # Gradients are ready (reduced over data parallel, divided by target_tokens). Look at
    # their norm before megatron-core's step, which would apply a non-finite update.
    run.optimizer.prepare_grads()
    grad_norm = float(run.optimizer.get_grad_norm())
    running_mean = run.monitor.running_mean
    skip, spike = run.monitor.observe(loss, grad_norm)
    if not skip:
        succeeded, clipped_norm, _ = run.optimizer.step()  # clips to config.clip_grad
        skip = not succeeded
        if clipped_norm is not None:
            grad_norm = float(clipped_norm)
    run.step += 1
    if run.parallel.on_accelerator:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    record = _train_record(run, loss, grad_norm, skip, spike, seconds)
    record["target_tokens"] = target_tokens
    run.totals["target_tokens"] += target_tokens
    if not skip:
        run.last_loss = loss
    if run.parallel.is_main and spike:
        run.metrics.event("spike", run.step, loss=loss, running_mean=running_mean)
        run.progress.note(
            f"megasft train: loss spike at step {run.step}: {loss:.4f}, above "
            f"{config.spike_factor} x the running mean {running_mean:.4f}"
        )
    if skip:
        if run.parallel.is_main:
            run.metrics.event(
                "skipped",
                run.step,
                loss=loss,
                grad_norm=grad_norm,
                skipped_steps=run.monitor.skipped_steps,
            )
            run.progress.note(
                f"megasft train: step {run.step} skipped: loss {loss}, gradient norm "
                f"{grad_norm} (skipped so far: {run.monitor.skipped_steps})"
            )
        _handle_bad_step(run, loss, grad_norm)
    return record, stop


def _model_inputs(run: Run, table: pa.Table, indices: np.ndarray) -> ModelInputs:
    """The micro-batch of these rows in the layout of this run, on the device."""
    batch: MicroBatch = collate(
        table,
        indices,
        run.plan.seq_length,
        PAD_ID,
        rows=run.config.micro_batch_size,
        attention_mask=not run.thd,
    )
    if not run.thd:
        return bshd_inputs(batch, run.parallel.device)
    from megatron.core import parallel_state

    sequence_parallel = run.parallel.on_accelerator and run.config.tensor_parallel > 1
    return thd_inputs(
        batch,
        run.parallel.device,
        context_parallel=run.config.context_parallel,
        context_rank=parallel_state.get_context_parallel_rank(),
        total_multiple=run.config.tensor_parallel if sequence_parallel else 1,
    )


def _data_iterators(
    run: Run, make_inputs: Callable[[np.ndarray], ModelInputs], batches: list[np.ndarray]
):
    """What the schedule pulls micro-batches from: one lazy iterator, or with virtual pipeline
    stages one iterator per model chunk over the same micro-batches."""
    if len(run.model) == 1:
        return (make_inputs(indices) for indices in batches)
    inputs = [make_inputs(indices) for indices in batches]
    return [iter(inputs) for _ in run.model]


def _sequence_length(run: Run) -> int:
    """The length of one micro-batch's sequence as the pipeline schedule sends it between
    stages: s for [b, s] rows, or b * s (rounded up for sequence parallelism) packed."""
    config = run.config
    if not run.thd:
        return run.plan.seq_length
    total = config.micro_batch_size * run.plan.seq_length
    multiple = config.tensor_parallel if config.tensor_parallel > 1 else 1
    return -(-total // multiple) * multiple


def _global_loss(run: Run, reported: list[dict[str, torch.Tensor]]) -> tuple[float, int, bool]:
    """(loss sum, target tokens) over the global batch, and whether any rank got SIGTERM.

    Only the last pipeline stage has losses; each tensor-parallel rank there has the same
    ones, so tensor rank 0 contributes them; data- and context-parallel ranks contribute
    their own. One all-reduce over all ranks gives every rank the totals.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=run.parallel.device)
    if reported and run.parallel.tensor_rank == 0:
        for item in reported:
            totals[:2] += item["loss_sum_and_count"].to(totals)
    totals[2] = float(run.sigterm_received)
    dist.all_reduce(totals)
    loss_sum, target_tokens, stop = totals.tolist()
    return loss_sum, int(target_tokens), stop > 0


def _train_record(
    run: Run, loss: float, grad_norm: float, skipped: bool, spike: bool, seconds: float
) -> dict[str, Any]:
    config = run.config
    lr = run.optimizer.param_groups[0]["lr"]
    record: dict[str, Any] = {
        "step": run.step,
        "epoch": round(run.step * config.global_batch_size / run.plan.train_rows, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_seconds": round(seconds, 4),
        "skipped": skipped,
        "skipped_steps": run.monitor.skipped_steps,
        "spike": spike,
    }
    if run.parallel.is_main:
        # The documents of the whole global batch, from the memory-mapped table.
        indices = run.sampler.global_batch(run.step - 1)
        lengths = (
            run.train_table.take(pa.array(indices, type=pa.int64()))
            .column("seq_lengths")
            .combine_chunks()
            .flatten()
            .to_numpy()
        )
        tokens = int(lengths.sum())
        flops = model_flops(run.architecture, lengths.tolist())
        tflops = flops / seconds / run.parallel.world_size / 1e12
        record.update(
            tokens=tokens,
            tokens_per_second=round(tokens / seconds, 1),
            tflops_per_device=round(tflops, 4),
            mfu=round(tflops / run.peak, 4) if run.peak else None,
        )
        run.totals["tokens"] += tokens
        run.totals["flops"] += flops
    run.totals["seconds"] += seconds
    run.totals["steps"] += 1
    return record


def _report(run: Run, record: dict[str, Any]) -> None:
    """metrics.jsonl, MLflow and the progress bar (rank 0)."""
    if not run.parallel.is_main:
        return
    config = run.config
    wanted = (
        run.step % config.log_interval == 0
        or record["skipped"]
        or record["spike"]
        or "val_loss" in record
        or run.step == config.train_iters
    )
    if wanted and math.isfinite(record["loss"]):  # a non-finite loss has its event instead
        run.metrics.write(record)
        keys = ("loss", "lr", "grad_norm", "tokens_per_second", "tflops_per_device", "mfu")
        run.tracker.log_metrics(
            {key: record.get(key) for key in (*keys, "skipped_steps", "val_loss")},
            step=record["step"],
        )
    run.progress.update(record["loss"], record["lr"], record.get("tokens_per_second", 0.0))


def _handle_bad_step(run: Run, loss: float, grad_norm: float) -> None:
    config = run.config
    what = f"loss {loss}, gradient norm {grad_norm}"
    latest = run.last_saved_step
    where = (
        f"; the last checkpoint is step {latest} in {config.save}"
        if latest is not None
        else "; no checkpoint was written yet"
    )
    reason = None
    if config.nan_policy == "stop":
        reason = f"step {run.step} has a non-finite {what} and --nan-policy is stop{where}"
    elif config.max_bad_steps and run.monitor.consecutive_skipped >= config.max_bad_steps:
        reason = (
            f"{run.monitor.consecutive_skipped} steps in a row (up to step {run.step}) had a "
            f"non-finite loss or gradient norm (last: {what}); stopping (--max-bad-steps "
            f"{config.max_bad_steps}). Lower --lr, check the data, or resume from a "
            f"checkpoint{where}"
        )
    if reason is not None:
        if run.parallel.is_main:
            run.metrics.event("stopped", run.step, reason=reason)
        finish(run, "stopped")
        raise TrainingStopped(reason)


# --- validation -------------------------------------------------------------------------------


def evaluate(run: Run) -> dict[str, Any]:
    """Validation loss on the val split: the mean over its target tokens, as
    `megasft.train.loss.masked_token_loss` defines it (what `megasft evaluate` reports).
    Returns the fields added to this step's metrics record."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if run.val_table is None:
        return {}
    config = run.config
    rows = run.plan.val_rows
    per_round = config.micro_batch_size * run.parallel.data_size
    rounds = -(-rows // per_round)
    if config.eval_batches:
        rounds = min(rounds, config.eval_batches)
    batches = []
    for index in range(rounds):  # this rank's rows of each round; the last may be short
        start = index * per_round + run.parallel.data_rank * config.micro_batch_size
        batches.append(np.arange(start, min(start + config.micro_batch_size, rows)))
    for chunk in run.model:
        chunk.eval()
    with torch.no_grad():
        reported = get_forward_backward_func()(
            forward_step_func=partial(forward_step, vocab_size=run.architecture.vocab_size),
            data_iterator=_data_iterators(run, partial(_model_inputs, run, run.val_table), batches),
            model=run.model if len(run.model) > 1 else run.model[0],
            num_microbatches=len(batches),
            seq_length=_sequence_length(run),
            micro_batch_size=1 if run.thd else config.micro_batch_size,
            forward_only=True,
        )
    for chunk in run.model:
        chunk.train()
    loss_sum, target_tokens, _ = _global_loss(run, reported)
    val_loss = loss_sum / target_tokens if target_tokens else None
    run.last_val_loss = val_loss
    if run.parallel.is_main:
        run.progress.note(f"megasft train: step {run.step}: val loss {val_loss}")
    return {"val_loss": val_loss, "val_target_tokens": target_tokens}


# --- checkpoints and the end ----------------------------------------------------------------------


def save(run: Run) -> Path:
    from megasft.train.checkpointing import adam_step, save_checkpoint

    config = run.config
    train_state = {
        "step": run.step,
        "adam_step": adam_step(run.optimizer),
        "train_iters": config.train_iters,
        "consumed_samples": run.step * config.global_batch_size,
        "world_size": run.parallel.world_size,
        "monitor": run.monitor.state(),
        "totals": run.totals,
        "last_val_loss": run.last_val_loss,
        "identity": run.identity,
        "config": asdict(config),
    }
    checkpoint = save_checkpoint(
        Path(config.save),
        run.step,
        run.model,
        run.optimizer,
        train_state,
        source_checkpoint=Path(config.load),
        keep=config.keep_checkpoints,
    )
    run.last_saved_step = run.step
    if run.parallel.is_main:
        run.progress.note(f"megasft train: checkpoint {checkpoint}")
    return checkpoint


def finish(run: Run, status: str) -> dict[str, Any]:
    """Write summary.json (rank 0) and close the progress bar and tracking run."""
    from megasft.train.checkpointing import iteration_name

    config = run.config
    totals = run.totals
    seconds = totals["seconds"] or math.nan
    tflops = totals["flops"] / seconds / run.parallel.world_size / 1e12
    summary = {
        "status": status,
        "steps": run.step,
        "train_iters": config.train_iters,
        "final_loss": run.last_loss,
        "final_val_loss": run.last_val_loss,
        "skipped_steps": run.monitor.skipped_steps,
        "loss_spikes": run.monitor.spikes,
        "tokens": int(totals["tokens"]),
        "target_tokens": int(totals["target_tokens"]),
        "train_seconds": round(totals["seconds"], 3),
        "tokens_per_second": round(totals["tokens"] / seconds, 1),
        "tflops_per_device": round(tflops, 4),
        "mfu": round(tflops / run.peak, 4) if run.peak else None,
        "checkpoint": str(Path(config.save) / iteration_name(run.last_saved_step))
        if run.last_saved_step is not None
        else None,
        "resumed_from": run.resumed_from,
        "world_size": run.parallel.world_size,
        "host": socket.gethostname(),
        "config": asdict(config),
    }
    if run.parallel.is_main:
        run.progress.close()
        run.tracker.finish(status)
        summary["tracking"] = run.tracker.summary()
        summary = {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in summary.items()
        }
        (Path(config.save) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
