"""What a training run reports: FLOPs and MFU, loss stability, the metrics log, progress.

Rank 0 writes `metrics.jsonl` (one line per logged step, each with a numeric `step` and `loss`;
an MoE model's lines add its routing, `megasft.train.moe`) and `events.jsonl` (skips, spikes,
resumes, preemption, stops) into the output directory; a resumed run drops the lines past its
checkpoint's step. The fields of both: docs/train.md, "Output".
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megasft.megatron.architecture import ModelArchitecture

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"

# Dense bf16 peak TFLOP/s per device (no sparsity), by a substring of the device name that
# torch reports. Checked in order; the first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("MI355X", 2516.6),
    ("MI325X", 1307.4),
    ("MI300X", 1307.4),
    ("MI300A", 980.6),
    ("MI250X", 383.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / HBM3
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """The device's dense peak for `precision`.

    Args:
        device_name: the accelerator's name as torch reports it (None on CPU).
        precision: the training precision ("bf16", "fp32").

    Returns:
        TFLOP/s, or None when unknown (CPU, fp32, other devices).
    """
    if device_name is None or precision != "bf16":
        return None
    for marker, peak in PEAK_BF16_TFLOPS:
        if marker in device_name:
            return peak
    return None


def model_flops(architecture: ModelArchitecture, document_lengths: Iterable[int]) -> float:
    """FLOPs of one forward and backward pass (3 x forward) over documents of these lengths.

    Counts the matrix multiplications of every layer and of the output layer, 2 FLOPs per
    multiply-add, and attention scores and values within each document, halved for the causal
    mask. An MoE layer counts its active parameters: the router and the `router_topk` experts
    each token goes to, not all of them. Padding is not counted: this is the useful work, so
    MFU is not flattered by it.

    Args:
        architecture: the model's architecture.
        document_lengths: the tokens of each document (packed documents counted apart).

    Returns:
        The FLOPs.
    """
    a = architecture
    query = a.num_attention_heads * a.head_dim
    key_value = 2 * a.num_query_groups * a.head_dim
    attention_projections = (
        a.hidden_size * (query + key_value)  # QKV projection
        + query * a.hidden_size  # attention output projection
    )
    dense_mlp = 3 * a.hidden_size * a.ffn_hidden_size  # gated MLP: gate, up, down
    matmul_parameters = a.num_layers * attention_projections + a.hidden_size * a.padded_vocab_size
    for layer in range(a.num_layers):
        if a.is_moe_layer(layer):
            experts = a.moe.router_topk * 3 * a.hidden_size * a.moe.expert_ffn_hidden_size
            matmul_parameters += a.hidden_size * a.moe.num_experts + experts  # router, experts
        else:
            matmul_parameters += dense_mlp
    tokens = 0
    attention = 0.0
    for length in document_lengths:
        tokens += length
        # QK^T and softmax(QK^T)V: 2 x (2 n^2 query) FLOPs per layer, half under the mask
        attention += 2.0 * length * length * query * a.num_layers
    return 3.0 * (2.0 * matmul_parameters * tokens + attention)


@dataclass
class StabilityMonitor:
    """Tells skipped (non-finite) steps and loss spikes; its state is part of a checkpoint."""

    spike_factor: float
    window: int = 20
    """Good steps in the running mean a spike is measured against."""
    min_history: int = 5
    """No spike is reported before this many good steps."""
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    spikes: int = 0
    recent_losses: deque = field(default_factory=deque)

    def observe(self, loss: float, grad_norm: float | None) -> tuple[bool, bool]:
        """Count a step's loss and gradient norm, and say what to do with it.

        Args:
            loss: the step's global loss.
            grad_norm: its gradient norm (None where not known).

        Returns:
            (skip: the loss or norm is not finite, spike: the loss is above `spike_factor` times
            the running mean).
        """
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if not finite:
            self.skipped_steps += 1
            self.consecutive_skipped += 1
            return True, False
        self.consecutive_skipped = 0
        spike = len(self.recent_losses) >= self.min_history and loss > self.spike_factor * (
            sum(self.recent_losses) / len(self.recent_losses)
        )
        self.spikes += spike
        self.recent_losses.append(loss)
        while len(self.recent_losses) > self.window:
            self.recent_losses.popleft()
        return False, spike

    @property
    def running_mean(self) -> float:
        """Mean loss of the recent good steps (NaN before the first)."""
        if not self.recent_losses:
            return math.nan
        return sum(self.recent_losses) / len(self.recent_losses)

    def state(self) -> dict[str, Any]:
        """The counters and recent losses, as a checkpoint's train state saves them."""
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skipped": self.consecutive_skipped,
            "spikes": self.spikes,
            "recent_losses": list(self.recent_losses),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the counters and recent losses `state` returned.

        Args:
            state: what `state()` returned.
        """
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skipped = state["consecutive_skipped"]
        self.spikes = state["spikes"]
        self.recent_losses = deque(state["recent_losses"])


class MetricsLog:
    """Appends to `metrics.jsonl` and `events.jsonl` in one directory (rank 0 only)."""

    def __init__(self, directory: Path):
        self.metrics = directory / METRICS_FILE
        self.events = directory / EVENTS_FILE

    def start_fresh(self) -> None:
        """A run that starts from --load: logs of an earlier run that saved nothing go."""
        for path in (self.metrics, self.events):
            path.unlink(missing_ok=True)

    def resume_at(self, step: int, checkpoint: str) -> None:
        """Drop lines past `step` (written by an interrupted run) and note the resume.

        Args:
            step: the step of the checkpoint resumed from.
            checkpoint: its path (recorded in the event).
        """
        for path in (self.metrics, self.events):
            if path.is_file():
                kept = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _line_step(line) <= step
                ]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.event("resume", step, checkpoint=checkpoint)

    def write(self, record: dict[str, Any]) -> None:
        """Append one step's metrics to metrics.jsonl (non-finite numbers as null).

        Args:
            record: the step's metrics.
        """
        _append(self.metrics, _finite_or_none(record))

    def event(self, name: str, step: int, **details: Any) -> None:
        """Append an event to events.jsonl (non-finite numbers as strings).

        Args:
            name: the event ("skipped", "spike", "resume", "preempted", "stopped").
            step: the step it happened at.
            **details: its fields.
        """
        details = {
            key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in details.items()
        }
        _append(self.events, {"event": name, "step": step, **details})


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: non-finite floats become null."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }


class Progress:
    """A tqdm bar on rank 0 with loss, learning rate and tokens/s; nothing elsewhere."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, loss: float | None, lr: float, tokens_per_second: float) -> None:
        """Advance the bar by one step and show its figures.

        Args:
            loss: the step's loss (None for a skipped step).
            lr: the learning rate.
            tokens_per_second: the step's throughput.
        """
        if self.bar is not None:
            self.bar.set_postfix(
                loss="nan" if loss is None or not math.isfinite(loss) else f"{loss:.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{tokens_per_second:,.0f}",
                refresh=False,
            )
            self.bar.update(1)

    def note(self, message: str) -> None:
        """Print a line above the bar, where there is one.

        Args:
            message: the line.
        """
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
