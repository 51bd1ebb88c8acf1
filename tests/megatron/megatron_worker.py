"""Runs megatron-core on CPU (through megasft's emulation layer) for the tests in this folder.

The tests never switch the emulation on in the pytest process, since it is process-wide;
they run this script instead and compare what it writes:

    python megatron_worker.py reference WORK_DIR                          # one process
    torchrun --nproc_per_node 2 megatron_worker.py parallel WORK_DIR      # two processes, gloo

WORK_DIR/spec.json names the converted checkpoints (and which are MoE models), the checkpoint
used for the training checks and the optimizer's learning rate and clip_grad;
WORK_DIR/tokens.pt holds the tokens ([b, s]). `reference` writes TP=1 logits per checkpoint,
one training step at TP=PP=DP=1, a few direct checks of the emulation layer, the MoE router's
choices on tied logits, and an MoE checkpoint loaded into and re-saved from the grouped-GEMM
expert layout; `parallel` writes TP=2 logits, EP=2 logits of the MoE models with the experts
each rank holds, a checkpoint re-saved at TP=2 by megatron-core itself, a PP=2 step, a DP=2
step, and a DP=2 step with the distributed optimizer.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_config import TransformerConfig

from megasft.constants import ARCHITECTURE_FILE
from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.builder import build_model, transformer_config
from megasft.megatron.parallel import destroy_parallel, initialize_parallel
from megasft.megatron.weights import load_weights
from tests.checkpoint.tiny_models import sample_tokens


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    spec = json.loads((work / "spec.json").read_text())
    tokens = torch.load(work / "tokens.pt")
    if mode == "reference":
        reference(spec, tokens, work)
    elif mode == "parallel":
        parallel(spec, tokens, work)
    else:
        raise SystemExit(f"unknown mode {mode}")


# --- the two runs ---------------------------------------------------------------------------------


def reference(spec: dict, tokens: torch.Tensor, work: Path) -> None:
    initialize_parallel(1, 1, device="cpu")
    emulation_checks(work)
    for name, checkpoint in spec["checkpoints"].items():
        torch.save(logits(checkpoint, tokens), work / f"logits_tp1_{name}.pt")
        torch.save(logits(checkpoint, tokens, "torch"), work / f"logits_tp1_torch_{name}.pt")
        torch.save(packed_documents(checkpoint), work / f"packed_documents_{name}.pt")
    torch.save(
        logits_with_megatron_loader(spec["checkpoints"]["llama"], tokens),
        work / "logits_raw_load_llama.pt",
    )
    torch.save(router_choices_on_ties(), work / "router_ties.pt")
    grouped_layout(spec["checkpoints"][spec["grouped_model"]], work / "resaved_grouped")
    result = training_step(
        spec, tokens, micro_batches=[tokens[:2], tokens[2:]], distributed_optimizer=False
    )
    torch.save(result, work / "step_reference.pt")
    destroy_parallel()


def parallel(spec: dict, tokens: torch.Tensor, work: Path) -> None:
    state = initialize_parallel(2, 1, device="cpu")
    for name, checkpoint in spec["checkpoints"].items():
        result = logits(checkpoint, tokens)
        with_torch_attention = logits(checkpoint, tokens, "torch")
        if state.rank == 0:
            torch.save(result, work / f"logits_tp2_{name}.pt")
            torch.save(with_torch_attention, work / f"logits_tp2_torch_{name}.pt")
    resave_at_tp2(spec["resave_checkpoint"], work / "resaved_tp2", rank=state.rank)

    # Expert parallel: each rank holds half of every MoE layer's experts.
    reset_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=2)
    for name in spec["moe_models"]:
        result = logits(spec["checkpoints"][name], tokens)
        if state.rank == 0:
            torch.save(result, work / f"logits_ep2_{name}.pt")
        torch.save(
            local_experts(spec["checkpoints"][name]),
            work / f"experts_ep2_{name}_rank{state.rank}.pt",
        )
    reset_parallel(tensor_parallel_size=1, pipeline_parallel_size=2)
    result = training_step(
        spec, tokens, micro_batches=[tokens[:2], tokens[2:]], distributed_optimizer=False
    )
    torch.save(result, work / f"step_pp2_rank{state.rank}.pt")

    reset_parallel(tensor_parallel_size=1, pipeline_parallel_size=1)
    # Data parallel: each rank gets half of the same global batch, one micro-batch each.
    half = tokens[2 * state.rank : 2 * state.rank + 2]
    for distributed_optimizer in (False, True):
        result = training_step(
            spec, tokens, micro_batches=[half], distributed_optimizer=distributed_optimizer
        )
        suffix = "_distopt" if distributed_optimizer else ""
        torch.save(result, work / f"step_dp2{suffix}_rank{state.rank}.pt")
    destroy_parallel()


def resave_at_tp2(checkpoint: str, destination: Path, *, rank: int) -> None:
    """Load at TP=2 and save with megatron-core's own `dist_checkpointing.save`, as a trainer
    does: each tensor then is stored in per-rank chunks, with `_extra_state` objects beside."""
    from megatron.core import dist_checkpointing

    from megasft.checkpoint.layout import ARCHITECTURE_FILE, HF_FILES_DIR

    _, _, model = load_model(checkpoint)
    if rank == 0:
        destination.mkdir()
        shutil.copy(Path(checkpoint) / ARCHITECTURE_FILE, destination / ARCHITECTURE_FILE)
        shutil.copytree(Path(checkpoint) / HF_FILES_DIR, destination / HF_FILES_DIR)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(destination))


def reset_parallel(
    *, tensor_parallel_size: int, pipeline_parallel_size: int, expert_parallel_size: int = 1
) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    initialize_parallel(
        tensor_parallel_size,
        pipeline_parallel_size,
        expert_parallel_size=expert_parallel_size,
        device="cpu",
    )


# --- what is measured ------------------------------------------------------------------------------


def read_architecture(checkpoint: str) -> ModelArchitecture:
    return ModelArchitecture.load(Path(checkpoint) / ARCHITECTURE_FILE)


def load_model(
    checkpoint: str,
    *,
    parallel_output: bool = True,
    attention: str | None = None,
    overrides: dict | None = None,
):
    architecture = read_architecture(checkpoint)
    from megatron.core import parallel_state

    experts = {}
    if architecture.moe is not None:
        experts = dict(
            expert_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        )
    config = transformer_config(
        architecture,
        tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        perform_initialization=False,
        overrides=overrides,
        **experts,
    )
    model = build_model(architecture, config, parallel_output=parallel_output, attention=attention)
    load_weights(model, checkpoint)
    return architecture, config, model


def logits(checkpoint: str, tokens: torch.Tensor, attention: str | None = None) -> torch.Tensor:
    """[b, s, vocab] logits, gathered over TP, without the padded vocabulary rows."""
    architecture, _, model = load_model(checkpoint, parallel_output=False, attention=attention)
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        output = model(tokens, positions, attention_mask=None)
    return output[..., : architecture.vocab_size].contiguous()


DOCUMENT_LENGTHS = [[11, 17, 12], [25, 9]]
"""Documents of two packed rows of SEQUENCE_LENGTH (40) tokens; the second row ends in 6
tokens of padding. Longer than the mistral model's window of 8, so that it matters."""


def packed_documents(checkpoint: str) -> dict:
    """The torch attention on packed documents, as rows with a block-diagonal mask and as one
    THD sequence, against each document run on its own through megatron-core's local
    attention: logits and the gradients of the summed next-token loss within documents."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megasft.train.batch import block_causal_mask, packed_position_ids

    tokens = sample_tokens(seed=1, batch_size=2)  # [2, 40]
    seq_len = tokens.shape[1]
    documents = []  # (row, start, end)
    for row, lengths in enumerate(DOCUMENT_LENGTHS):
        start = 0
        for length in lengths:
            documents.append((row, start, start + length))
            start += length

    def summed_loss(logits: torch.Tensor) -> torch.Tensor:  # logits [2, 40, v]
        loss = 0.0
        for row, start, end in documents:
            loss = loss + torch.nn.functional.cross_entropy(
                logits[row, start : end - 1], tokens[row, start + 1 : end], reduction="sum"
            )
        return loss

    # MoE models: no load-balancing loss, whose gradient depends on which tokens share a batch
    no_aux_loss = {"moe_aux_loss_coeff": 0.0} if read_architecture(checkpoint).moe else None

    def run(attention, forward) -> dict:
        architecture, _, model = load_model(
            checkpoint, parallel_output=False, attention=attention, overrides=no_aux_loss
        )
        logits = forward(model)[..., : architecture.vocab_size]  # [2, 40, v]
        summed_loss(logits).backward()
        return {
            "logits": {document: logits[document[0], document[1] : document[2]].detach()
                       for document in documents},
            "gradients": {name: p.grad.clone() for name, p in model.named_parameters()},
        }  # fmt: skip

    def one_by_one(model):
        pieces = {
            (row, start): model(tokens[row, start:end][None], torch.arange(end - start)[None], None)
            for row, start, end in documents
        }  # each [1, length, v]
        logits = torch.zeros(2, seq_len, next(iter(pieces.values())).shape[-1])
        for (row, start), piece in pieces.items():
            logits[row, start : start + piece.shape[1]] = piece[0]
        return logits

    positions = packed_position_ids(DOCUMENT_LENGTHS, seq_len)
    mask = block_causal_mask(DOCUMENT_LENGTHS, seq_len)

    def rows(model):
        return model(tokens, positions, mask)

    def thd(model):
        # every document, and row 1's padding tail as one more
        flat = [length for lengths in DOCUMENT_LENGTHS for length in lengths] + [6]
        cu_seqlens = torch.tensor([0, *flat]).cumsum(0).to(torch.int32)
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max(flat), max_seqlen_kv=max(flat),
        )  # fmt: skip
        output = model(tokens.reshape(1, -1), positions.reshape(1, -1), None,
                       packed_seq_params=params)  # fmt: skip
        return output.reshape(2, seq_len, -1)

    return {
        "one_by_one_local": run(None, one_by_one),
        "rows_torch": run("torch", rows),
        "thd_torch": run("torch", thd),
    }


def logits_with_megatron_loader(checkpoint: str, tokens: torch.Tensor) -> torch.Tensor:
    """As `logits`, but loaded by megatron-core's own `dist_checkpointing.load` with the whole
    sharded state dict, `_extra_state` included, as docs/convert.md says it can be."""
    from megatron.core import dist_checkpointing

    architecture = read_architecture(checkpoint)
    model = build_model(
        architecture, transformer_config(architecture, perform_initialization=False)
    )
    state_dict = dist_checkpointing.load(model.sharded_state_dict(), checkpoint, strict="log_all")
    model.load_state_dict(state_dict)
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)[..., : architecture.vocab_size]


def local_experts(checkpoint: str) -> dict[str, torch.Tensor]:
    """This rank's experts of the last layer, by global expert number: {"e.fc1": ..., ...}."""
    _, _, model = load_model(checkpoint)
    moe = model.decoder.layers[-1].mlp
    return {
        f"{expert}.{name}": getattr(module, name).weight.detach().clone()
        for expert, module in zip(moe.local_expert_indices, moe.experts.local_experts, strict=True)
        for name in ("linear_fc1", "linear_fc2")
    }


def router_choices_on_ties() -> dict:
    """HFTopKRouter's (probs, routing map) for logits full of ties: 512 tokens, 8 experts,
    logits drawn from {0, 1, 2, 3}, top-2 and top-4, with and without renormalisation."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megasft.megatron.moe_router import HFTopKRouter

    logits = torch.randint(0, 4, (512, 1, 8), generator=torch.Generator().manual_seed(0)).float()
    results = {"logits": logits}
    for topk in (2, 4):
        for normalize in (False, True):
            config = TransformerConfig(
                num_layers=1,
                hidden_size=8,
                num_attention_heads=1,
                num_moe_experts=8,
                moe_router_topk=topk,
                moe_router_pre_softmax=True,
                moe_ffn_hidden_size=8,
                moe_aux_loss_coeff=0.0,
                use_cpu_initialization=True,
            )
            router = HFTopKRouter(config, get_default_pg_collection(), normalize_topk=normalize)
            results[(topk, normalize)] = router.routing(logits)
    return results


def grouped_layout(checkpoint: str, destination: Path) -> None:
    """Load an MoE checkpoint into the grouped-GEMM expert layout (megatron-core's legacy
    GroupedMLP: each layer's experts as two matrices, [hidden, experts*2*ffn] and
    [experts*ffn, hidden]), check its weights against the sequential experts, and re-save it
    with megatron-core's `dist_checkpointing.save` for the tests to export."""
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.moe import experts as experts_module
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megasft.checkpoint.layout import ARCHITECTURE_FILE, HF_FILES_DIR
    from megasft.megatron import builder

    if not hasattr(experts_module, "GroupedMLP"):
        # megatron-core 0.19 has only Transformer Engine's grouped GEMM (GPUs).
        return
    _, _, sequential = load_model(checkpoint)
    architecture = read_architecture(checkpoint)
    family_spec = builder.layer_spec

    def grouped_spec(*args, **kwargs):
        spec = family_spec(*args, **kwargs | {"transformer_engine": False})
        for layer_spec in getattr(spec, "layer_specs", [spec]):
            if hasattr(layer_spec.submodules.mlp.submodules, "experts"):
                layer_spec.submodules.mlp.submodules.experts = ModuleSpec(
                    module=experts_module.GroupedMLP
                )
        return spec

    # GroupedMLP asserts at construction that the grouped_gemm CUDA kernels import; building
    # and loading its weights needs none of them (only its forward does).
    experts_module.gg.assert_grouped_gemm_is_available = lambda: None
    builder.layer_spec = grouped_spec
    try:
        config = transformer_config(architecture, perform_initialization=False)
        grouped = build_model(architecture, config)
    finally:
        builder.layer_spec = family_spec
    load_weights(grouped, checkpoint)
    hidden = architecture.hidden_size
    layers = zip(grouped.decoder.layers, sequential.decoder.layers, strict=True)
    for number, (layer, sequential_layer) in enumerate(layers):
        if not architecture.is_moe_layer(number):
            continue
        experts = layer.mlp.experts
        assert isinstance(experts, experts_module.GroupedMLP)
        count = experts.num_local_experts
        # What the grouped GEMMs multiply by: per expert, fc1 as [hidden, 2*ffn], fc2 as
        # [ffn, hidden], the transposes of the sequential experts' weights.
        fc1 = experts.weight1.view(count, hidden, -1)
        fc2 = experts.weight2.view(count, -1, hidden)
        for expert, mlp in enumerate(sequential_layer.mlp.experts.local_experts):
            assert torch.equal(fc1[expert].t(), mlp.linear_fc1.weight), (number, expert)
            assert torch.equal(fc2[expert].t(), mlp.linear_fc2.weight), (number, expert)
    destination.mkdir()
    shutil.copy(Path(checkpoint) / ARCHITECTURE_FILE, destination / ARCHITECTURE_FILE)
    shutil.copytree(Path(checkpoint) / HF_FILES_DIR, destination / HF_FILES_DIR)
    dist_checkpointing.save(grouped.sharded_state_dict(), str(destination))


def training_step(
    spec: dict,
    tokens: torch.Tensor,
    *,
    micro_batches: list[torch.Tensor],
    distributed_optimizer: bool,
) -> dict:
    """One Adam step (with gradient clipping) through megatron-core's DDP, schedule and optimizer.

    The loss is the mean next-token cross entropy of each micro-batch, averaged over
    micro-batches and data-parallel ranks: with equal micro-batches, the mean over the global
    batch, whatever the layout.
    """
    from functools import partial

    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _, config, model = load_model(spec["training_checkpoint"])
    config.finalize_model_grads_func = finalize_model_grads
    ddp_model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
        ),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=spec["learning_rate"],
            weight_decay=0.0,
            clip_grad=spec["clip_grad"],
            bf16=False,
            fp16=False,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp_model],
    )

    def loss_function(output: torch.Tensor):
        loss = output.float().mean()  # output: [b, s] per-token cross entropy
        return loss, {"loss": loss.detach()}

    def forward_step(batches, model):
        batch = next(batches)
        inputs, labels = batch[:, :-1], batch[:, 1:]  # label i is token i + 1
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)
        output = model(inputs, positions, attention_mask=None, labels=labels)
        return output, partial(loss_function)

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[ddp_model],
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1] - 1,
        micro_batch_size=micro_batches[0].shape[0],
        forward_only=False,
    )
    gradients = {name: param.main_grad.clone() for name, param in global_parameters(model)}
    succeeded, grad_norm, _ = optimizer.step()
    return {
        "succeeded": succeeded,
        "losses": [float(loss["loss"]) for loss in losses],
        "gradients": gradients,
        # Clipping scales the gradients in place (the full ones only without the
        # distributed optimizer, which clips its own shard).
        "clipped_gradients": {
            name: param.main_grad.clone() for name, param in global_parameters(model)
        },
        "grad_norm": float(grad_norm),
        "parameters": {name: param.detach().clone() for name, param in global_parameters(model)},
    }


def global_parameters(model):
    """(name, parameter) with layer numbers counted over the whole model, not this stage."""
    for name, parameter in model.named_parameters():
        match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
        if match:
            layer = model.decoder.layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{layer}.{match.group(2)}"
        yield name, parameter


def emulation_checks(work: Path) -> None:
    """Direct observations of the redirects, for test_cpu_emulation.py."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megasft.megatron.cpu import enable_cpu_emulation

    enable_cpu_emulation()  # a second call is a no-op
    outside_before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        forked_again = torch.rand(4)
    checks = {
        "cuda_literal_device": str(torch.empty(2, device="cuda").device),
        "current_device_tensor": str(torch.zeros(1, device=torch.cuda.current_device()).device),
        "dot_cuda_device": str(torch.ones(1).cuda().device),
        "to_cuda_device": str(torch.ones(1).to("cuda:0").device),
        "float_type_name": torch.ones(1).type(),
        "bf16_type_name": torch.ones(1, dtype=torch.bfloat16).type(),
        "fork_restores_outside_state": bool(torch.equal(outside_before, torch.get_rng_state())),
        "fork_stream_advances": not torch.equal(forked, forked_again),
        "world_size": dist.get_world_size(),
    }
    (work / "emulation_checks.json").write_text(json.dumps(checks))


if __name__ == "__main__":
    main()
