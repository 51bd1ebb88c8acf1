"""Step 1's loss and gradients against plain PyTorch, at every layout and micro-batch count.

The reference is computed here, in the test process, with transformers' model in fp32 and no
megasft code on the path: every document of the step's global batch run on its own, the
cross entropies of its target tokens summed, the sum divided once by the global batch's
target count, and `backward()`. Megatron-core's gradients are captured as it finished them
(gradient_capture.py), gathered over tensor-parallel shards and pipeline stages. The model is
the workspace's sharp one, whose predictions are far from uniform, so that which tokens are
targets and how they are weighted moves the loss and the gradients well beyond 1e-5. The
workspace's Qwen3-MoE (load-balancing loss off, as transformers computes its loss) checks the
routers' and experts' gradients too, and the gradient norm at EP=2.

What these tests catch (checked by injecting each bug): gradients scaled by the micro-batch
count, a mean of per-micro-batch means, swapped K and V in the conversion, targets shifted
by one position. See docs/train.md ("What the numerics tests catch").
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megasft.data.store import open_split
from tests.train import gradient_capture
from tests.train.launching import result_of
from tests.train.reference import first_global_batch

pytestmark = pytest.mark.slow

RELATIVE = 1e-5

# scenario -> (results fixture, HF model, dataset, global batch, tensor-parallel size,
# gradients captured)
SCENARIOS = {
    "gradients": ("single", "sharp_hf_model", "packed", 8, 1, True),  # 4 micro-batches of 2
    "gradients_one_micro_batch": ("single", "sharp_hf_model", "packed", 8, 1, True),
    "gradients_unpacked": ("single", "sharp_hf_model", "unpacked", 8, 1, True),  # 8 of 1 row
    "gradients_tp2": ("parallel", "sharp_hf_model", "packed", 8, 2, True),
    "gradients_pp2": ("parallel", "sharp_hf_model", "packed", 8, 1, True),
    "gradients_dp2": ("parallel", "sharp_hf_model", "packed", 8, 1, True),  # 2 per rank
    "gradients_dp2_distributed_optimizer": ("parallel", "sharp_hf_model", "packed", 8, 1, False),
    # the routers and experts too; at EP=2 each rank holds half the experts (the norm only)
    "gradients_moe": ("moe_single", "hf_moe_model", "packed", 8, 1, True),
    "gradients_moe_ep2": ("moe_parallel", "hf_moe_model", "packed", 8, 1, False),
}


@functools.cache
def reference_step(hf_model: Path, dataset: Path, rows: tuple[int, ...]):
    """(loss, {HF name: gradient}) of the masked token-mean loss over these rows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        hf_model, dtype=torch.float32, attn_implementation="eager"
    )
    table = open_split(dataset).take(list(rows)).to_pylist()
    loss_sum, count = torch.zeros(()), 0
    for row in table:
        start = 0
        for length in row["seq_lengths"]:  # each document on its own
            ids = torch.tensor(row["input_ids"][start : start + length])
            mask = torch.tensor(row["loss_mask"][start : start + length], dtype=torch.float32)
            start += length
            logits = model(ids[None]).logits[0]  # [n, vocab]
            losses = F.cross_entropy(logits[:-1], ids[1:], reduction="none")  # [n - 1]
            loss_sum = loss_sum + (losses * mask[1:]).sum()  # logits[i] predicts token i + 1
            count += int(mask[1:].sum())
    loss = loss_sum / count
    loss.backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.item(), gradients, model.config


def as_megatron(hf: dict[str, torch.Tensor], config, tensor_parallel: int) -> dict:
    """The HF gradients in megatron-core's parameters (local layer spec), written out here
    rather than taken from the converter, so that a conversion bug cannot hide in both."""
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_group = heads // groups
    expected = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "output_layer.weight": hf["lm_head.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    for layer in range(config.num_hidden_layers):
        ours, theirs = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        q, k, v = (hf[f"{theirs}self_attn.{x}_proj.weight"] for x in "qkv")
        # per query group: its query heads, then its key head, then its value head
        qkv = []
        for group in range(groups):
            qkv += [
                q[group * per_group * head_dim : (group + 1) * per_group * head_dim],
                k[group * head_dim : (group + 1) * head_dim],
                v[group * head_dim : (group + 1) * head_dim],
            ]
        expected |= {
            f"{ours}input_layernorm.weight": hf[f"{theirs}input_layernorm.weight"],
            f"{ours}self_attention.linear_qkv.weight": torch.cat(qkv),
            f"{ours}self_attention.linear_proj.weight": hf[f"{theirs}self_attn.o_proj.weight"],
            f"{ours}pre_mlp_layernorm.weight": hf[f"{theirs}post_attention_layernorm.weight"],
        }
        if f"{theirs}self_attn.q_norm.weight" in hf:  # Qwen3's per-head QK norm
            expected |= {
                f"{ours}self_attention.q_layernorm.weight": hf[f"{theirs}self_attn.q_norm.weight"],
                f"{ours}self_attention.k_layernorm.weight": hf[f"{theirs}self_attn.k_norm.weight"],
            }
        if f"{theirs}mlp.gate.weight" in hf:  # MoE: the router, then each expert (TP=1)
            # transformers 5 stacks the experts: gate_up_proj [E, 2 ffn, h] (gate rows, then
            # up rows, as megatron-core's fc1), down_proj [E, h, ffn]
            expected[f"{ours}mlp.router.weight"] = hf[f"{theirs}mlp.gate.weight"]
            for expert, (fc1, fc2) in enumerate(
                zip(hf[f"{theirs}mlp.experts.gate_up_proj"],
                    hf[f"{theirs}mlp.experts.down_proj"], strict=True)
            ):  # fmt: skip
                prefix = f"{ours}mlp.experts.local_experts.{expert}"
                expected |= {f"{prefix}.linear_fc1.weight": fc1, f"{prefix}.linear_fc2.weight": fc2}
            continue
        # each tensor-parallel rank holds [its gate rows; its up rows]
        gate, up = hf[f"{theirs}mlp.gate_proj.weight"], hf[f"{theirs}mlp.up_proj.weight"]
        fc1 = [
            torch.cat([g, u])
            for g, u in zip(gate.chunk(tensor_parallel), up.chunk(tensor_parallel), strict=True)
        ]
        expected |= {
            f"{ours}mlp.linear_fc1.weight": torch.cat(fc1),
            f"{ours}mlp.linear_fc2.weight": hf[f"{theirs}mlp.down_proj.weight"],
        }
    return expected


def _run(request, name: str):
    fixture, model, dataset_name, global_batch_size, tensor_parallel, captured = SCENARIOS[name]
    result = result_of(request.getfixturevalue(fixture), name)
    workspace = request.getfixturevalue("workspace")
    dataset = getattr(workspace, dataset_name)
    loss, gradients, config = reference_step(
        getattr(workspace, model), dataset, first_global_batch(dataset, global_batch_size)
    )
    return result, loss, gradients, config, tensor_parallel, captured


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_step_one_loss_and_gradient_norm_equal_plain_pytorch(request, name):
    result, loss, gradients, *_ = _run(request, name)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in gradients.values()))
    assert abs(result["losses"][0] - loss) <= RELATIVE * loss
    assert abs(result["grad_norms"][0] - norm) <= RELATIVE * norm


@pytest.mark.parametrize("name", [name for name, s in SCENARIOS.items() if s[5]])
def test_step_one_parameter_gradients_equal_plain_pytorch(request, name):
    result, _, gradients, config, tensor_parallel, _ = _run(request, name)
    captured = gradient_capture.read(Path(result["gradients"]))
    expected = as_megatron(gradients, config, tensor_parallel)
    assert sorted(captured) == sorted(expected)
    vocab = config.vocab_size
    for parameter, reference in expected.items():
        actual = captured[parameter]
        if actual.shape[0] > reference.shape[0]:  # the embedding's padding rows: no gradient
            assert parameter in ("embedding.word_embeddings.weight", "output_layer.weight")
            assert torch.count_nonzero(actual[vocab:]) == 0, parameter
            actual = actual[:vocab]
        error = (actual - reference).norm().item()
        assert error <= RELATIVE * reference.norm().item(), (parameter, error)


def test_the_sharp_model_is_far_from_uniform(request):
    """Its first-step loss is nowhere near ln V, the loss of uniform predictions."""
    _, loss, _, config, *_ = _run(request, "gradients")
    assert loss > math.log(config.vocab_size) + 3.0
