"""The SFT recipe on megatron-core: setup, train, cleanup, read top to bottom.

    setup    the model (its weights from --load, or the newest checkpoint in --save to
             resume), the optimizer, the LR schedule, the data, the restored loop state, and
             reporting: `Parts` (built once) and `LoopState` (what the loop changes)
    train    per step: the micro-batches of this data-parallel rank through megatron-core's
             pipeline schedule (`step.forward_step` / `step.loss_func`), the global loss,
             the NaN/Inf check, the optimizer step; then metrics, validation, checkpoints
    cleanup  the final checkpoint (unless --no-final-checkpoint), summary.json, the groups

Called on every rank (`megasft.train.worker` under torchrun, or in-process for one process).
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megasft.errors import MegasftError
from megasft.train.build import setup_model, setup_optimizer, setup_scheduler
from megasft.train.checks import RunPlan, plan_run
from megasft.train.config import TrainConfig
from megasft.train.distributed import Parallel, setup_parallel, teardown_parallel
from megasft.train.feed import setup_data
from megasft.train.moe import routing_metrics
from megasft.train.reporting import finish, open_reporting, report, step_record
from megasft.train.run import LoopState, Parts, prepare_save_dir, restore, save
from megasft.train.step import forward_step
from megasft.train.update import apply_update, prepared_grad_norm

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


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `config`.

    Args:
        config: the settings; checked against the data and the model first.

    Returns:
        The run's summary (what rank 0 writes to summary.json).

    Raises:
        Preempted: a SIGTERM was handled (a checkpoint was written; its summary is attached).
        TrainingStopped: the run was unstable (non-finite steps, by policy or too many).
        ConfigError, InputError: settings or inputs that cannot work.
    """
    from megasft.megatron.cpu import accelerator_present

    plan = plan_run(config, on_accelerator=accelerator_present())
    parallel = setup_parallel(plan.config)
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        parts, state = setup(plan, parallel)

        def on_sigterm(signum, frame):
            state.sigterm_received = True  # acted on at the end of the step, by every rank at once

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            status = train_loop(parts, state)
        except Preempted as stopped:
            stopped.summary = finish(parts, state, "preempted")
            raise
        return finish(parts, state, status)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        teardown_parallel(parallel)


# --- setup ------------------------------------------------------------------------------------


def setup(plan: RunPlan, parallel: Parallel) -> tuple[Parts, LoopState]:
    """Build what the run trains with, and the loop's state to start from (collective).

    Args:
        plan: the checked run.
        parallel: this rank's place in the process grid.

    Returns:
        (the run's parts, the loop's state: fresh, or restored from the newest checkpoint).
    """
    config = plan.config
    prepare_save_dir(config, parallel)
    model = setup_model(plan, parallel)  # the layers and attention of plan.attention
    optimizer = setup_optimizer(plan, model)
    scheduler = setup_scheduler(config, optimizer)
    data = setup_data(plan, parallel)
    state = restore(plan, parallel, model, optimizer)
    scheduler.num_steps = state.updates
    reporting = open_reporting(plan, parallel, step=state.step, resumed_from=state.resumed_from)
    parts = Parts(
        plan=plan,
        parallel=parallel,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        reporting=reporting,
        nan_steps=_injected_nan_steps(),
        routing=routing_metrics(plan, parallel, model),
    )
    return parts, state


def _injected_nan_steps() -> frozenset[int]:
    value = os.environ.get(INJECT_NAN_ENV, "")
    return frozenset(int(step) for step in value.split(",") if step.strip())


# --- train --------------------------------------------------------------------------------------


def train_loop(parts: Parts, state: LoopState) -> str:
    """Steps until train_iters; returns the final status. Raises Preempted on SIGTERM."""
    config = parts.config
    while state.step < config.train_iters:
        record, stop = train_step(parts, state)
        last = state.step == config.train_iters
        if (config.eval_interval and state.step % config.eval_interval == 0) or (
            last and parts.data.val is not None
        ):
            record.update(validate(parts, state))
        report(parts, record)
        if stop:  # SIGTERM: save where we are and leave
            checkpoint = save(parts, state)
            parts.reporting.event("preempted", state.step, checkpoint=str(checkpoint))
            raise Preempted(checkpoint)
        if config.save_interval and state.step % config.save_interval == 0:
            save(parts, state)
    if config.final_checkpoint and state.last_saved_step != state.step:
        save(parts, state)
    return "completed"


def train_step(parts: Parts, state: LoopState) -> tuple[dict[str, Any], bool]:
    """One optimizer step over a global batch; returns its metrics record and whether a
    SIGTERM asks the run to stop."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config, data, optimizer, monitor = parts.config, parts.data, parts.optimizer, state.monitor
    started = time.perf_counter()
    for chunk in parts.model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    parts.scheduler.step(1)  # the rate of this update: see build.setup_scheduler

    batches = data.sampler.micro_batches(state.step)
    forward_backward = get_forward_backward_func()
    reported = forward_backward(
        forward_step_func=partial(
            forward_step,
            vocab_size=parts.architecture.vocab_size,
            inject_nan=(state.step + 1) in parts.nan_steps,
        ),
        data_iterator=data.iterators(data.train, batches, len(parts.model)),
        model=parts.model if len(parts.model) > 1 else parts.model[0],
        num_microbatches=len(batches),
        seq_length=data.schedule_seq_length,
        micro_batch_size=data.schedule_micro_batch_size,
        forward_only=False,
    )
    loss_sum, target_tokens, stop = _global_loss(parts, state, reported)
    loss = loss_sum / target_tokens if target_tokens else 0.0

    # Gradients are ready (reduced over data parallel, divided by target_tokens). Look at
    # their norm before updating: a non-finite step is skipped, not applied.
    grad_norm, found_inf = prepared_grad_norm(optimizer)
    running_mean = monitor.running_mean
    skip, spike = monitor.observe(loss, grad_norm)
    skip = skip or found_inf
    if not skip:
        skip = not apply_update(optimizer, grad_norm)  # clipped to --clip-grad by grad_norm
    if skip:  # no update: the schedule stays where it was for the next step
        parts.scheduler.step(-1)
    else:
        state.updates += 1
    state.step += 1
    if parts.parallel.on_accelerator:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    record = step_record(parts, state, loss, grad_norm, skipped=skip, spike=spike, seconds=seconds)
    record["target_tokens"] = target_tokens
    if parts.routing is not None:
        record.update(parts.routing.step_metrics(len(batches)))
    state.totals["target_tokens"] += target_tokens
    if not skip:
        state.last_loss = loss
    if spike:
        parts.reporting.event("spike", state.step, loss=loss, running_mean=running_mean)
        parts.reporting.note(
            f"megasft train: loss spike at step {state.step}: {loss:.4f}, above "
            f"{config.spike_factor} x the running mean {running_mean:.4f}"
        )
    if skip:
        parts.reporting.event(
            "skipped",
            state.step,
            loss=loss,
            grad_norm=grad_norm,
            skipped_steps=monitor.skipped_steps,
        )
        parts.reporting.note(
            f"megasft train: step {state.step} skipped: loss {loss}, gradient norm "
            f"{grad_norm} (skipped so far: {monitor.skipped_steps})"
        )
        _handle_bad_step(parts, state, loss, grad_norm)
    return record, stop


def _global_loss(
    parts: Parts, state: LoopState, reported: list[dict[str, torch.Tensor]]
) -> tuple[float, int, bool]:
    """(loss sum, target tokens) over the global batch, and whether any rank got SIGTERM.

    Only the last pipeline stage has losses; each tensor-parallel rank there has the same
    ones, so tensor rank 0 contributes them; data- and context-parallel ranks contribute
    their own. One all-reduce over all ranks gives every rank the totals.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=parts.parallel.device)
    if reported and parts.parallel.tensor_rank == 0:
        for item in reported:
            totals[:2] += item["loss_sum_and_count"].to(totals)
    totals[2] = float(state.sigterm_received)
    dist.all_reduce(totals)
    loss_sum, target_tokens, stop = totals.tolist()
    return loss_sum, int(target_tokens), stop > 0


def _handle_bad_step(parts: Parts, state: LoopState, loss: float, grad_norm: float) -> None:
    """Stop the run (TrainingStopped) when --nan-policy or --max-bad-steps says so."""
    config = parts.config
    what = f"loss {loss}, gradient norm {grad_norm}"
    latest = state.last_saved_step
    where = (
        f"; the last checkpoint is step {latest} in {config.save}"
        if latest is not None
        else "; no checkpoint was written yet"
    )
    consecutive = state.monitor.consecutive_skipped
    reason = None
    if config.nan_policy == "stop":
        reason = f"step {state.step} has a non-finite {what} and --nan-policy is stop{where}"
    elif config.max_bad_steps and consecutive >= config.max_bad_steps:
        reason = (
            f"{consecutive} steps in a row (up to step {state.step}) had a "
            f"non-finite loss or gradient norm (last: {what}); stopping (--max-bad-steps "
            f"{config.max_bad_steps}). Lower --lr, check the data, or resume from a "
            f"checkpoint{where}"
        )
    if reason is not None:
        parts.reporting.event("stopped", state.step, reason=reason)
        finish(parts, state, "stopped")
        raise TrainingStopped(reason)


# --- validation -------------------------------------------------------------------------------


def validate(parts: Parts, state: LoopState) -> dict[str, Any]:
    """Validation loss on the val split: the mean over its target tokens, as
    `megasft.train.loss.masked_token_loss` defines it (what `megasft evaluate` reports).
    Returns the fields added to this step's metrics record."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = parts.data
    if data.val is None:
        return {}
    batches = data.val_batches(parts.config.eval_batches)
    for chunk in parts.model:
        chunk.eval()
    with torch.no_grad():
        reported = get_forward_backward_func()(
            forward_step_func=partial(forward_step, vocab_size=parts.architecture.vocab_size),
            data_iterator=data.iterators(data.val, batches, len(parts.model)),
            model=parts.model if len(parts.model) > 1 else parts.model[0],
            num_microbatches=len(batches),
            seq_length=data.schedule_seq_length,
            micro_batch_size=data.schedule_micro_batch_size,
            forward_only=True,
        )
    for chunk in parts.model:
        chunk.train()
    loss_sum, target_tokens, _ = _global_loss(parts, state, reported)
    val_loss = loss_sum / target_tokens if target_tokens else None
    state.last_val_loss = val_loss
    parts.reporting.note(f"megasft train: step {state.step}: val loss {val_loss}")
    return {"val_loss": val_loss, "val_target_tokens": target_tokens}
