"""`megasft plan`'s report: the parts of the fullest rank, the verdict, and what to change.

`report` is the text the command prints; `recipe_comment` the lines a recipe carries (the
tests compare them with a fresh plan); `plan_record` the same figures as a dict (`--json`,
the pipeline's validate step).
"""

from __future__ import annotations

from typing import Any

from megasft.plan.devices import GIB
from megasft.plan.layout import sequence_parallel
from megasft.plan.memory import ALLOWANCE_FIXED_GIB, FRAGMENTATION, MemoryPlan, suggestions
from megasft.plan.parameters import experts_buffered_apart


def _gib(value: int) -> str:
    return f"{value / GIB:7.2f}"


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e9 else f"{parameters / 1e6:.1f} M"


def _per(plan: MemoryPlan) -> str:
    return "per GPU" if plan.layout.accelerator else "per process"


def layout_line(plan: MemoryPlan) -> str:
    """The layout in one line: parallel sizes, batch, precision, optimizer, recompute."""
    layout = plan.layout
    parts = [
        f"TP {layout.tensor_parallel} x PP {layout.pipeline_parallel}"
        + (
            f" (x{layout.virtual_pipeline_stages} virtual)"
            if layout.virtual_pipeline_stages > 1
            else ""
        )
        + f" x CP {layout.context_parallel} x DP {layout.data_parallel}"
        + (
            f" (experts: EP {layout.expert_parallel} x ETP {layout.expert_tensor_size}"
            f" x expert-DP {layout.expert_data_parallel})"
            if plan.architecture.moe is not None
            else ""
        ),
        f"micro-batch {layout.micro_batch_size} x {layout.seq_length} tokens,"
        f" {layout.micro_batches} per step",
        layout.precision,
        "distributed optimizer" if layout.distributed_optimizer else "no distributed optimizer",
        f"sequence parallel {'on' if sequence_parallel(plan.architecture, layout) else 'off'}",
        f"recompute {layout.recompute}"
        + (f" ({layout.recompute_layers} layers)" if layout.recompute_layers else ""),
    ]
    if layout.hidden_dropout or layout.attention_dropout:
        parts.append(f"dropout {layout.hidden_dropout}/{layout.attention_dropout}")
    if layout.fp8 != "none":
        parts.append(f"fp8 {layout.fp8} (activations counted at 16 bits)")
    if layout.peft is not None:
        peft = layout.peft
        parts.append(
            f"{peft.method} rank {peft.rank} on {', '.join(peft.targets)}"
            + (f", dropout {peft.dropout}" if peft.dropout else "")
        )
    return ", ".join(parts)


def part_rows(plan: MemoryPlan) -> list[tuple[str, int, str]]:
    """(part, bytes, how it is counted) of the fullest rank, the total last."""
    layout, stage = plan.layout, plan.worst
    static, activations = stage.static, stage.activations
    shards = layout.gradient_shards if layout.distributed_optimizer else 1
    sharded = f", 1/{shards} per rank" if shards > 1 else ""
    if (
        plan.architecture.moe is not None
        and layout.distributed_optimizer
        and experts_buffered_apart(layout)
    ):
        sharded += f" (the experts' 1/{layout.expert_data_parallel})"
    return [
        (
            "weights",
            static.weights,
            f"{static.parameters:,} parameters in {layout.precision}"
            + (f", {static.trainable:,} trained" if static.trainable < static.parameters else ""),
        ),
        ("gradients", static.gradients, "fp32 buffer"),
        (
            "fp32 main weights",
            static.main_weights,
            f"fp32 copy{sharded}" if static.main_weights else "the fp32 weights themselves",
        ),
        ("optimizer states", static.optimizer_states, f"Adam's 2 fp32 moments{sharded}"),
        *(
            [("fp8 weight copies", static.fp8_weights, "FP8 weights and transposes (TE)")]
            if static.fp8_weights
            else []
        ),
        (
            "activations",
            activations.stored + activations.transient,
            f"{activations.in_flight} micro-batch(es) in flight {activations.stored / GIB:.2f}"
            f" + backward working memory {activations.transient / GIB:.2f}",
        ),
        (
            "allowance",
            stage.allowance,
            f"{ALLOWANCE_FIXED_GIB:g} GiB workspace + {FRAGMENTATION:.0%} of activations",
        ),
        (
            "total",
            stage.total,
            f"of {plan.device_memory / GIB:.1f} GiB ({stage.total / plan.device_memory:.0%})",
        ),
    ]


def report(plan: MemoryPlan) -> str:
    """The text `megasft plan` prints."""
    a, layout = plan.architecture, plan.layout
    experts = ""
    if a.moe is not None:
        experts = f", {a.moe.num_experts} experts (top {a.moe.router_topk})"
    lines = [
        f"model: {a.family}, {_count(plan.model_parameters)} parameters, {a.num_layers} layers,"
        f" hidden {a.hidden_size}, vocabulary {a.padded_vocab_size}{experts}",
        f"devices: {layout.world_size} x {plan.device} ({plan.device_memory / GIB:.1f} GiB each)",
        f"layout: {layout_line(plan)}",
        "",
        f"{_per(plan)}, pipeline stage {plan.worst.stage} (the fullest)   GiB",
    ]
    for name, value, how in part_rows(plan):
        lines.append(f"  {name:<20} {_gib(value)}   {how}")
    if len(plan.stages) > 1:
        lines.append(
            "  by stage: " + ", ".join(f"{s.stage}: {s.total / GIB:.2f}" for s in plan.stages)
        )
    lines.append("")
    spare = plan.device_memory - plan.worst.total
    if plan.fits:
        lines.append(f"verdict: fits, {spare / GIB:.2f} GiB to spare")
        return "\n".join(lines) + "\n"
    lines.append(f"verdict: does not fit, {-spare / GIB:.2f} GiB over")
    found = suggestions(plan)
    if found:
        lines.append("changes that fit (one at a time):")
        lines += [f"  {flags:<40} {changed.worst.total / GIB:7.2f} GiB" for flags, changed in found]
    else:
        lines.append(
            "no single change fits: combine more TP/PP with --recompute full, use more GPUs, "
            "or a smaller --seq-length"
        )
    return "\n".join(lines) + "\n"


def recipe_comment(plan: MemoryPlan) -> list[str]:
    """The figures a recipe carries in its header, one per line, without the `#`."""
    gib = {name: f"{value / GIB:.1f}" for name, value, _ in part_rows(plan)}
    return [
        f"{_count(plan.model_parameters)} parameters on {plan.layout.world_size} x "
        f"{plan.device}, {plan.layout.seq_length}-token rows; {_per(plan)}, in GiB:",
        f"weights {gib['weights']}, gradients {gib['gradients']}, fp32 main weights "
        f"{gib['fp32 main weights']}, optimizer states {gib['optimizer states']},",
        f"activations {gib['activations']}, allowance {gib['allowance']}: total {gib['total']} "
        f"of {plan.device_memory / GIB:.1f} ({'fits' if plan.fits else 'does not fit'})",
    ]


def plan_record(plan: MemoryPlan) -> dict[str, Any]:
    """The plan's figures as plain data (bytes), for `--json` and the pipeline."""
    return {
        "device": plan.device,
        "device_memory": plan.device_memory,
        "model_parameters": plan.model_parameters,
        "layout": layout_line(plan),
        "worst_stage": plan.worst.stage,
        "parts": {name: value for name, value, _ in part_rows(plan)},
        "stages": [stage.total for stage in plan.stages],
        "fits": plan.fits,
    }
