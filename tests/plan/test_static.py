"""The plan's parameters and static memory equal the live megatron-core model's, to the
element and the byte, for every family at TP1, TP2, PP2 and DP2, with and without the
distributed optimizer, and for the MoE families with their experts over EP 2 and whole
experts under TP 2 (plan_worker.py builds each with the trainer's settings on CPU)."""

from __future__ import annotations

import json
import math

import pytest

from megasft.megatron.architecture import ModelArchitecture
from megasft.plan.buffers import rank_static_memory
from megasft.plan.layout import Layout
from megasft.plan.parameters import chunk_parameters
from tests.plan.conftest import peft_settings, static_scenarios

SCENARIOS = {scenario["name"]: scenario for scenario in static_scenarios()}


def planned(scenario: dict, pipeline_rank: int, data_rank: int, expert_data_rank: int = 0):
    architecture = ModelArchitecture.from_json(json.dumps(scenario["architecture"]))
    layout = Layout(
        seq_length=8,
        world_size=scenario["world_size"],
        tensor_parallel=scenario["tp"],
        pipeline_parallel=scenario["pp"],
        virtual_pipeline_stages=scenario.get("vp") or 1,
        expert_parallel=scenario.get("ep", 1),
        expert_tensor_parallel=scenario.get("etp"),
        global_batch_size=8,
        precision=scenario["precision"],
        distributed_optimizer=scenario["distributed_optimizer"],
        accelerator=False,  # the CPU path: megatron-core's local layers, no buckets
        peft=peft_settings(scenario),
    )
    chunks = [
        chunk_parameters(architecture, layout, pipeline_rank, chunk)
        for chunk in range(layout.virtual_pipeline_stages)
    ]
    buckets = [scenario.get("bucket_size") if index == 0 else None for index in range(len(chunks))]
    if pipeline_rank > 0:
        buckets = [None] * len(chunks)  # megatron-core buckets the first stage only
    return chunks, rank_static_memory(
        chunks, layout, pipeline_rank, data_rank, buckets, expert_shard_rank=expert_data_rank
    )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_static_memory_of_every_rank_is_exact(static_runs, name):
    _, measured = static_runs
    ranks = measured[name]
    assert len(ranks) == SCENARIOS[name]["world_size"], f"{name}: not every rank reported"
    for rank in ranks:
        chunks, memory = planned(
            SCENARIOS[name], rank["pipeline_rank"], rank["data_rank"], rank["expert_data_rank"]
        )
        assert [[[p.name, list(p.shape)] for p in chunk] for chunk in chunks] == rank["chunks"]
        assert {
            "weights": memory.weights,
            "gradients": memory.gradients,
            "main_weights": memory.main_weights,
            "optimizer_states": memory.optimizer_states,
        } == {
            key: rank[key] for key in ("weights", "gradients", "main_weights", "optimizer_states")
        }


def test_the_scenarios_cover_padding_and_uneven_shards(static_runs):
    _, measured = static_runs
    dp2 = {rank["data_rank"]: rank for rank in measured["qwen3_dp2_distopt"]}
    elements = sum(math.prod(shape) for chunk in dp2[0]["chunks"] for _, shape in chunk)
    assert dp2[0]["gradients"] > 4 * elements  # qwen3's 32-element QK norms start at 64
    assert dp2[0]["main_weights"] != dp2[1]["main_weights"]  # the padding sits in one shard
    assert measured["llama_fp32_distopt"][0]["main_weights"] == 0  # fp32: its own main weights


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_worker_ends_each_scenarios_process_groups(static_runs, world_size):
    # a scenario's groups left alive keep gloo's threads, about 60 a layout, and slowed the
    # two-process run to minutes of system time
    _, measured = static_runs
    names = [s["name"] for s in static_scenarios() if s["world_size"] == world_size]
    for rank in range(world_size):
        threads = [measured[name][rank]["threads"] for name in names]
        assert len(threads) > 10 and max(threads) <= threads[0] + 16, threads
