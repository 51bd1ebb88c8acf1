"""Runs plan_worker.py once per session (one process, then two under torchrun) and hands the
tests what it measured, beside the scenarios it was asked to build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megasft.megatron.architecture import ModelArchitecture, architecture_from_hf_config

WORKER = Path(__file__).with_name("plan_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

LORA = dict(peft="lora", lora_rank=8, lora_alpha=16.0)
"""TrainConfig's LoRA settings for the scenarios that train adapters."""
ALL_TARGETS = "linear_qkv,linear_proj,linear_fc1,linear_fc2,output_layer"
"""Every LoRA target: the four linears of each layer and the output layer."""
STATIC_LAYOUTS = (
    # (name, world size, TP, PP, distributed optimizer, precision)
    ("tp1", 1, 1, 1, False, "bf16"),
    ("tp1_distopt", 1, 1, 1, True, "bf16"),
    ("tp2", 2, 2, 1, False, "bf16"),
    ("tp2_distopt", 2, 2, 1, True, "bf16"),
    ("pp2", 2, 1, 2, False, "bf16"),
    ("pp2_distopt", 2, 1, 2, True, "bf16"),
    ("dp2", 2, 1, 1, False, "bf16"),
    ("dp2_distopt", 2, 1, 1, True, "bf16"),
)


def peft_settings(scenario: dict):
    """The PeftSettings a scenario's TrainConfig settings give (None: full fine-tuning)."""
    from megasft.train.config import TrainConfig

    if "peft" not in scenario:
        return None
    return TrainConfig(
        data=".", load=".", save=".", train_iters=1, **scenario["peft"]
    ).peft_settings


def tiny_architectures() -> dict[str, ModelArchitecture]:
    """Every tiny test model (tests/checkpoint/tiny_models.py: one per family and variant)."""
    from tests.checkpoint.tiny_models import _COMMON, TINY_MODELS

    architectures = {}
    for name, model in TINY_MODELS.items():
        config = model.config_class(**_COMMON, **model.config_fields).to_dict()
        config["architectures"] = [model.model_class.__name__]
        architectures[name] = architecture_from_hf_config(config)
    return architectures


def static_scenarios() -> list[dict]:
    scenarios = []
    for family, architecture in tiny_architectures().items():
        for name, world_size, tp, pp, distributed_optimizer, precision in STATIC_LAYOUTS:
            scenarios.append(
                dict(
                    name=f"{family}_{name}",
                    architecture=json.loads(architecture.to_json()),
                    world_size=world_size,
                    tp=tp,
                    pp=pp,
                    distributed_optimizer=distributed_optimizer,
                    precision=precision,
                )
            )
    for family in ("llama", "qwen2", "qwen3"):  # LoRA: biases and QK norms stay frozen
        for name, world_size, tp, pp, distributed_optimizer, precision in STATIC_LAYOUTS[1::2]:
            scenarios.append(
                dict(
                    name=f"{family}_lora_{name}",
                    architecture=json.loads(tiny_architectures()[family].to_json()),
                    world_size=world_size,
                    tp=tp,
                    pp=pp,
                    distributed_optimizer=distributed_optimizer,
                    precision=precision,
                    peft=LORA,
                )
            )
    llama = json.loads(tiny_architectures()["llama"].to_json())
    qwen3_moe = json.loads(tiny_architectures()["qwen3_moe"].to_json())
    scenarios += [
        # the experts over EP 2: a buffer of their own, each rank half the experts
        dict(name="qwen3_moe_ep2", architecture=qwen3_moe, world_size=2, tp=1, pp=1, ep=2,
             distributed_optimizer=False, precision="bf16"),
        dict(name="qwen3_moe_ep2_distopt", architecture=qwen3_moe, world_size=2, tp=1, pp=1,
             ep=2, distributed_optimizer=True, precision="bf16"),
        dict(name="mixtral_ep2_distopt", world_size=2, tp=1, pp=1, ep=2,
             distributed_optimizer=True, precision="bf16",
             architecture=json.loads(tiny_architectures()["mixtral"].to_json())),
        dict(name="qwen3_moe_dense_ep2_distopt", world_size=2, tp=1, pp=1, ep=2,
             distributed_optimizer=True, precision="bf16",
             architecture=json.loads(tiny_architectures()["qwen3_moe_dense"].to_json())),
        # TP 2 with whole experts (ETP 1), over EP 2 or replicated on both TP ranks
        dict(name="qwen3_moe_tp2_ep2_etp1_distopt", architecture=qwen3_moe, world_size=2,
             tp=2, pp=1, ep=2, etp=1, distributed_optimizer=True, precision="bf16"),
        dict(name="qwen3_moe_tp2_etp1_distopt", architecture=qwen3_moe, world_size=2, tp=2,
             pp=1, etp=1, distributed_optimizer=True, precision="bf16"),
        # LoRA on the attention of an MoE model, its experts frozen
        dict(name="qwen3_moe_lora_ep2_distopt", architecture=qwen3_moe, world_size=2, tp=1,
             pp=1, ep=2, distributed_optimizer=True, precision="bf16",
             peft=LORA | {"lora_targets": "linear_qkv,linear_proj"}),
    ]  # fmt: skip
    scenarios += [
        # two of the four linears adapted, without the distributed optimizer
        dict(name="qwen2_lora_two_targets_tp2", world_size=2, tp=2, pp=1,
             distributed_optimizer=False, precision="bf16",
             architecture=json.loads(tiny_architectures()["qwen2"].to_json()),
             peft=LORA | {"lora_targets": "linear_qkv,linear_fc2"}),
        # the output layer adapted too: its B split by vocabulary rows over TP
        dict(name="llama_lora_output_layer_tp2_distopt", world_size=2, tp=2, pp=1,
             distributed_optimizer=True, precision="bf16", architecture=llama,
             peft=LORA | {"lora_targets": "linear_qkv,output_layer"}),
        # fp32: the parameters are their own main weights
        dict(name="llama_fp32_distopt", architecture=llama, world_size=2, tp=1, pp=1,
             distributed_optimizer=True, precision="fp32"),
        # several gradient buckets, each padded for the distributed optimizer
        dict(name="llama_dp2_buckets", architecture=llama, world_size=2, tp=1, pp=1,
             distributed_optimizer=True, precision="bf16", bucket_size=5000),
        # the interleaved schedule: two chunks per pipeline rank, tied embeddings split
        dict(name="llama_tied_pp2_vp2", world_size=2, tp=1, pp=2, vp=2,
             distributed_optimizer=True, precision="bf16",
             architecture=json.loads(tiny_architectures()["llama_tied"].to_json())
             | {"num_layers": 4}),
    ]  # fmt: skip
    return scenarios


ACTIVATION_MODEL = dict(
    hidden_size=256,
    ffn_hidden_size=704,
    num_attention_heads=8,
    num_query_groups=4,
    head_dim=32,
    num_layers=2,
    vocab_size=1000,
    padded_vocab_size=1024,
    max_position_embeddings=4096,
)


MOE_ACTIVATION_MODEL = dict(num_experts=8, router_topk=2, expert_ffn_hidden_size=128)
"""The MoE blocks of the activation scenarios' MoE models."""


def activation_scenarios() -> list[dict]:
    """Small models on rows long enough that the tensors, not the allocator's rounding,
    decide the measurement; MoE models also at EP 2 and TP 2 (two processes)."""
    variants = {
        "none": {},
        "selective": dict(recompute="selective"),
        "full": dict(recompute="full"),
        "full1": dict(recompute="full", recompute_layers=1),
        "dropout": dict(hidden_dropout=0.1, attention_dropout=0.1),
        "lora": dict(peft=LORA),
        "lora_dropout": dict(peft=LORA | {"lora_dropout": 0.1}),
    }
    moe_lora = dict(peft=LORA | {"lora_targets": "linear_qkv,linear_proj"})
    moe_variants = {name: variants[name] for name in ("none", "selective", "full", "dropout")}
    families = {
        "llama": variants | {"lora_output_layer": dict(peft=LORA | {"lora_targets": ALL_TARGETS})},
        "qwen3": variants,
        "qwen3_moe": moe_variants | {"lora": moe_lora},
        "mixtral": {"none": {}},
        "qwen3_moe_dense": {"none": {}, "full1": variants["full1"]},  # layer 0 dense
    }
    architectures = tiny_architectures()
    scenarios = []
    for family, family_variants in families.items():
        architecture = json.loads(architectures[family].to_json()) | ACTIVATION_MODEL
        if architecture["moe"] is not None:
            architecture["moe"] |= MOE_ACTIVATION_MODEL
            architecture["sliding_window"] = None  # Mixtral's: no change to what is kept
        for variant, settings in family_variants.items():
            for seq_length, rows in ((128, 2), (512, 1)):
                for precision in ("fp32", "bf16"):
                    scenarios.append(
                        dict(
                            name=f"{family}_{variant}_s{seq_length}_b{rows}_{precision}",
                            architecture=architecture,
                            world_size=1,
                            tp=1,
                            pp=1,
                            distributed_optimizer=False,
                            precision=precision,
                            seq_length=seq_length,
                            micro_batch_size=rows,
                            **settings,
                        )
                    )
    moe = json.loads(architectures["qwen3_moe"].to_json()) | ACTIVATION_MODEL
    moe["moe"] |= MOE_ACTIVATION_MODEL
    for name, tp, ep, etp in (("ep2", 1, 2, None), ("tp2", 2, 1, None), ("tp2_ep2_etp1", 2, 2, 1)):
        for precision in ("fp32", "bf16"):
            scenarios.append(
                dict(
                    name=f"qwen3_moe_{name}_s512_b1_{precision}",
                    architecture=moe,
                    world_size=2,
                    tp=tp,
                    pp=1,
                    ep=ep,
                    etp=etp,
                    distributed_optimizer=False,
                    precision=precision,
                    seq_length=512,
                    micro_batch_size=1,
                )
            )
    return scenarios


def _run(command: list[str], description: str) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    if result.returncode != 0:
        pytest.fail(f"{description} failed ({result.returncode}):\n{result.stderr[-6000:]}")


def _results(work: Path, mode: str) -> dict[str, list[dict]]:
    """Scenario name -> what every rank measured."""
    results: dict[str, list[dict]] = {}
    for path in sorted(work.glob(f"{mode}_world*_rank*.json")):
        for name, result in json.loads(path.read_text()).items():
            results.setdefault(name, []).append(result)
    return results


@pytest.fixture(scope="session")
def plan_work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("plan-worker")
    spec = {"static": static_scenarios(), "activations": activation_scenarios()}
    (work / "spec.json").write_text(json.dumps(spec))
    return work


@pytest.fixture(scope="session")
def static_runs(plan_work) -> tuple[list[dict], dict[str, list[dict]]]:
    """(the scenarios, what each rank of each measured)."""
    _run([sys.executable, str(WORKER), "static", str(plan_work)], "the one-process static run")
    _run([*TORCHRUN, str(WORKER), "static", str(plan_work)], "the two-process static run")
    return static_scenarios(), _results(plan_work, "static")


@pytest.fixture(scope="session")
def activation_runs(plan_work) -> tuple[list[dict], dict[str, list[dict]]]:
    _run([sys.executable, str(WORKER), "activations", str(plan_work)], "the activation run")
    _run([*TORCHRUN, str(WORKER), "activations", str(plan_work)], "the two-process activation run")
    return activation_scenarios(), _results(plan_work, "activations")
