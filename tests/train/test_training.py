"""The training stage end to end on CPU, through megatron-core's emulation layer.

Three launches do the heavy work (see train_worker.py): one process runs the single-rank
scenarios, one two-rank torchrun job runs the parallel layouts, and the resume test drives
`megasft train --nproc 2` itself, killing and restarting it. The tests compare what those
runs wrote with independent references.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import REPO
from tests.train.launching import launch, result_of, worker_env
from tests.train.records import read_metrics
from tests.train.reference import first_global_batch, reference_loss
from tests.train.workspace import Workspace

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


# --- 1. the first loss equals the transformers model's -------------------------------------------


def test_first_step_loss_equals_the_transformers_model(workspace, single):
    reference = result_of(single, "reference")
    rows = first_global_batch(workspace.packed, global_batch_size=8)
    expected = reference_loss(workspace.hf_model, workspace.packed, "train", rows)
    assert abs(reference["losses"][0] - expected) < TOLERANCE


def test_validation_loss_equals_the_converted_checkpoints_loss(workspace, single, tmp_path):
    """The last validation loss, recomputed by transformers from the final checkpoint
    converted to Hugging Face: validation, checkpoint and conversion agree."""
    from megasft.checkpoint.convert import convert

    result = result_of(single, "validation")
    assert [step for step, _ in result["val"]] == [2, 4]
    hf = tmp_path / "hf"
    convert("megatron", "hf", result["checkpoint"], hf)
    expected = reference_loss(hf, workspace.with_val, "val")
    assert abs(result["val"][-1][1] - expected) < TOLERANCE
    # and the evaluation stage draws the run's metrics.jsonl as its training log
    from megasft.evaluate.report import read_training_log

    log = read_training_log(Path(result["checkpoint"]).parent / "metrics.jsonl")
    assert [row["step"] for row in log] == [1, 2, 3, 4]


# --- 2. every parallel layout trains the same curve ---------------------------------------------


@pytest.mark.parametrize(
    "layout", ["tp2", "pp2", "dp2", "dp2_distributed_optimizer", "pp2_interleaved"]
)
def test_parallel_layout_reproduces_the_single_rank_curve(single, parallel, layout):
    reference = result_of(single, "reference")
    result = result_of(parallel, layout)
    assert len(result["losses"]) == len(reference["losses"]) == 5
    assert result["target_tokens"] == reference["target_tokens"]
    for actual, expected in zip(result["losses"], reference["losses"], strict=True):
        assert abs(actual - expected) < TOLERANCE
    # Adam hides a wrongly scaled gradient in the loss; the gradient norm shows it.
    for actual, expected in zip(result["grad_norms"], reference["grad_norms"], strict=True):
        assert abs(actual - expected) < TOLERANCE * expected


def test_dropout_is_on_and_tp2_draws_the_masks_of_tp1(single, parallel):
    """Hidden dropout draws from the default generator, seeded alike on every tensor-parallel
    rank and consumed alike at TP=1 and TP=2: the same masks, the same curve. Attention
    dropout draws from megatron-core's tensor-parallel stream, one per rank (each rank's heads
    their own masks, as in Megatron-LM): the curve of TP=2 is then another sample of the same
    training, close to TP=1's but not equal."""
    reference = result_of(single, "reference")["losses"]
    hidden = result_of(single, "hidden_dropout")
    dropout = result_of(single, "dropout")["losses"]
    assert all(abs(a - b) > 1e-4 for a, b in zip(hidden["losses"], reference, strict=True))
    tp2 = result_of(parallel, "tp2_hidden_dropout")
    for actual, expected in zip(tp2["losses"], hidden["losses"], strict=True):
        assert abs(actual - expected) < TOLERANCE
    for actual, expected in zip(tp2["grad_norms"], hidden["grad_norms"], strict=True):
        assert abs(actual - expected) < TOLERANCE * expected
    tp2_both = result_of(parallel, "tp2_dropout")["losses"]
    assert tp2_both != dropout
    for actual, expected in zip(tp2_both, dropout, strict=True):
        assert abs(actual - expected) < 0.05 * expected


def test_dropout_run_resumes_exactly(single):
    result = result_of(single, "dropout_resume")
    assert result["again"] == result["first"]


def test_vocab_parallel_loss_equals_masked_token_loss(parallel):
    result = result_of(parallel, "cross_entropy_parity")
    real, empty = result["real"], result["no_targets"]
    assert real["count"] == real["expected_count"] > 0
    assert abs(real["sum"] - real["expected_sum"]) < TOLERANCE * real["expected_sum"]
    assert (empty["sum"], empty["count"]) == (0.0, 0)
    assert real["finite_gradients"] and empty["finite_gradients"]


# --- 3. packed rows give the loss of their examples unpacked ---------------------------------------


def test_packed_batch_gives_the_loss_of_the_same_examples_unpacked(single):
    packed = result_of(single, "packed_all")
    unpacked = result_of(single, "unpacked_all")
    assert packed["target_tokens"] == unpacked["target_tokens"]
    assert abs(packed["losses"][0] - unpacked["losses"][0]) < TOLERANCE
    assert abs(packed["grad_norms"][0] - unpacked["grad_norms"][0]) < TOLERANCE


# --- 5. it learns ----------------------------------------------------------------------------------


def test_overfitting_16_examples_drives_the_loss_below_0_05(single):
    losses = result_of(single, "overfit")["losses"]
    assert losses[0] > 1.0
    assert losses[-1] < 0.05


# --- 6. stability ------------------------------------------------------------------------------------


def test_injected_nan_is_skipped_and_counted(single):
    reference = result_of(single, "reference")
    result = result_of(single, "nan_skipped")
    # metrics.jsonl has numeric losses only; the skipped step is an event
    assert result["steps"] == [1, 2, 4, 5, 6]
    assert result["events"] == [
        {"event": "skipped", "step": 3, "loss": "nan", "grad_norm": "nan", "skipped_steps": 1}
    ]
    assert result["summary"]["skipped_steps"] == 1
    assert result["summary"]["status"] == "completed"
    assert result["losses"][:2] == reference["losses"][:2]
    assert all(np.isfinite(loss) for loss in result["losses"])
    # The skipped step applied no update, so the schedule did not advance: steps 4, 5 and 6
    # train at the rates of updates 3, 4 and 5 (warmup 1 step, cosine to 1e-4 at step 6).
    expected = [_scheduled_lr(update, warmup=1, last=6) for update in (1, 2, 3, 4, 5)]
    assert result["lrs"] == pytest.approx(expected, rel=1e-12)


def _scheduled_lr(update: int, *, warmup: int, last: int, peak=1e-3, floor=1e-4) -> float:
    """Linear warmup to `peak`, then cosine to `floor` at update `last`."""
    if update <= warmup:
        return peak * update / warmup
    progress = (update - warmup) / (last - warmup)
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def test_bad_steps_in_a_row_or_the_stop_policy_end_the_run(single):
    assert "3 steps in a row (up to step 4)" in result_of(single, "nan_in_a_row")["stopped"]
    assert "--nan-policy is stop" in result_of(single, "nan_policy_stop")["stopped"]


def test_micro_batches_without_targets_contribute_nothing(single):
    all_masked = result_of(single, "all_masked")
    assert all_masked["losses"] == [0.0, 0.0]
    assert all_masked["skipped"] == [False, False]
    # One row per micro-batch: clearing the first row's mask equals leaving the row out.
    masked = result_of(single, "first_row_masked")
    dropped = result_of(single, "first_row_dropped")
    assert masked["target_tokens"] == dropped["target_tokens"]
    assert abs(masked["losses"][0] - dropped["losses"][0]) < 1e-9
    assert abs(masked["grad_norms"][0] - dropped["grad_norms"][0]) < 1e-9


# --- 4. kill, preempt, resume --------------------------------------------------------------------


def test_preempted_single_process_run_resumes_exactly(single):
    result = result_of(single, "resume_in_process")
    # SIGTERM once step 3 is logged: the step in progress finishes and is saved
    assert result["preempted_at"] in ("iter_0000004", "iter_0000005")
    assert result["resumed"] == result["uninterrupted"]


def test_resume_at_another_tensor_parallel_size_continues_the_run(parallel):
    """Without the distributed optimizer, megatron-core reshards the checkpoint to TP=2."""
    result = result_of(parallel, "resume_with_another_layout")
    assert len(result["resumed"]) == len(result["first"]) == 4
    for resumed, first in zip(result["resumed"], result["first"], strict=True):
        assert abs(resumed - first) < TOLERANCE


def test_resume_that_would_change_the_run_is_refused_naming_the_setting(parallel):
    result = result_of(parallel, "resume_with_another_layout")
    assert "--train-iters was 4, now 6" in result["train_iters_changed"]
    assert "--tp was 1, now 2: the distributed optimizer" in result["distributed_at_tp2"]
    assert "start a new --save directory with --load" in result["distributed_at_tp2"]


def test_bf16_run_resumes_exactly_and_starts_at_the_fp32_loss(single):
    result = result_of(single, "bf16_resume")
    reference = result_of(single, "reference")
    assert abs(result["first"][0] - reference["losses"][0]) < 2e-2  # bf16 weights
    assert result["again"] == result["first"]  # steps 3 and 4 redone from the step-2 checkpoint


def _train_command(workspace: Workspace, save: Path) -> list[str]:
    return [
        sys.executable, "-m", "megasft", "train",
        "--data", str(workspace.packed), "--load", str(workspace.mcore_model),
        "--save", str(save), "--nproc", "2", "--train-iters", "10", "--save-interval", "2",
        "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3",
        "--min-lr", "1e-4", "--warmup-iters", "1", "--precision", "fp32", "--seed", "1234",
        "--distributed-optimizer",
    ]  # fmt: skip


def _lines(path: Path) -> list[dict]:
    """The complete lines of a JSON Lines file that a running process appends to."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line being written
            lines.append(json.loads(line))
    return lines


def _trained_since_start(save: Path, steps: int, resuming: bool) -> bool:
    """True once this run has logged `steps` steps (after its resume event, if resuming)."""
    resumed_at = [e["step"] for e in _lines(save / "events.jsonl") if e["event"] == "resume"]
    if resuming and not resumed_at:
        return False
    since = resumed_at[-1] if resumed_at else 0
    return sum(line["step"] > since for line in _lines(save / "metrics.jsonl")) >= steps


def _start_and_signal(command, save: Path, steps: int, sig: int, resuming: bool):
    """Start the run; once it has trained `steps` steps, send `sig` (to every process of the
    run for SIGKILL, as when a node dies; to the command only for SIGTERM, as a scheduler
    does)."""
    process = subprocess.Popen(
        command,
        env=worker_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not _trained_since_start(save, steps, resuming):
        assert process.poll() is None, f"the run ended early: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    if sig == signal.SIGKILL:
        # torchrun starts each rank in a session of its own: kill the whole tree.
        parent = psutil.Process(process.pid)
        for member in [parent, *parent.children(recursive=True)]:
            member.kill()
    else:
        process.send_signal(sig)
    return process


def test_killed_and_preempted_run_resumes_exactly(workspace, parallel, tmp_path):
    """Test 4 (with DP=2 and the distributed optimizer, through `megasft train --nproc 2`):
    SIGKILL at a random step, resume, SIGTERM (checkpoint and exit 143), resume to the end;
    the losses of every step equal those of the uninterrupted run."""
    uninterrupted = result_of(parallel, "resume_reference")
    save = tmp_path / "run"
    command = _train_command(workspace, save)

    killed = _start_and_signal(command, save, random.randint(3, 5), signal.SIGKILL, False)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(path.name for path in save.glob("iter_*"))
    assert checkpoints and checkpoints[-1] < "iter_0000010"

    preempted = _start_and_signal(command, save, 1, signal.SIGTERM, True)
    _, stderr = preempted.communicate(timeout=120)
    assert preempted.returncode == 143, stderr[-3000:]
    summary = json.loads((save / "summary.json").read_text())
    assert summary["status"] == "preempted"
    assert summary["checkpoint"] == str(save / f"iter_{summary['steps']:07d}")
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(summary["steps"])

    launch(command, timeout=300)
    records = read_metrics(save / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, 11))
    assert [record["loss"] for record in records] == uninterrupted["losses"]
    assert json.loads((save / "summary.json").read_text())["status"] == "completed"
    # Only the newest two checkpoints are kept; no partial directory is left behind.
    assert sorted(path.name for path in save.iterdir() if "iter_" in path.name) == [
        "iter_0000008",
        "iter_0000010",
    ]

    # The final checkpoint is a megasft megatron checkpoint: convertible to Hugging Face.
    hf = tmp_path / "hf"
    launch(
        [sys.executable, "-m", "megasft", "convert", "--from", "megatron", "--to", "hf",
         "--src", str(save / "iter_0000010"), "--dst", str(hf)],
        timeout=120,
    )  # fmt: skip
    from safetensors.torch import load_file

    tuned = load_file(hf / "model.safetensors")
    base = load_file(workspace.hf_model / "model.safetensors")
    assert sorted(tuned) == sorted(base)
    assert not torch.equal(tuned["model.norm.weight"], base["model.norm.weight"])
