"""The parts a run trains with, on megatron-core: the model, the optimizer, the LR schedule.

Each `setup_*` function builds one of them from the checked settings (megasft.train.checks)
and this rank's place in the process grid. Why each megatron-core setting is what it is is
said beside it; docs/train.md has the whole picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megasft.megatron.architecture import ModelArchitecture
from megasft.train.checks import RunPlan
from megasft.train.config import TrainConfig
from megasft.train.distributed import Parallel
from megasft.train.moe import moe_settings


def uses_sequence_parallel(
    config: TrainConfig, parallel: Parallel, architecture: ModelArchitecture
) -> bool:
    """Sequence parallelism: automatic with TP > 1 on accelerators (Transformer Engine's
    layers); megatron-core's local layers (CPU) run without it, but for MoE models, whose
    MoE layer trains with TP only under it (megasft.train.moe)."""
    return config.tensor_parallel > 1 and (parallel.on_accelerator or architecture.moe is not None)


def layer_settings(plan: RunPlan) -> dict[str, Any]:
    """megatron-core's TransformerConfig fields for --hidden-dropout, --attention-dropout,
    --recompute, --recompute-layers and --fp8.

    Args:
        plan: the checked run (its settings, and the model's layers for full recompute).

    Returns:
        The fields by name.
    """
    config = plan.config
    settings: dict[str, Any] = dict(
        hidden_dropout=config.hidden_dropout, attention_dropout=config.attention_dropout
    )
    if config.recompute == "selective":  # megatron-core's default module: the core attention
        settings.update(recompute_granularity="selective")
    elif config.recompute == "full":
        chunk_layers = plan.architecture.num_layers // (
            config.pipeline_parallel * (config.virtual_pipeline_stages or 1)
        )
        # "block": the first N layers of each chunk keep only their input
        settings.update(
            recompute_granularity="full",
            recompute_method="block",
            recompute_num_layers=config.recompute_layers or chunk_layers,
        )
    if config.fp8 != "none":  # delayed scaling, megatron-core's default recipe
        settings.update(fp8=config.fp8)
    return settings


def setup_model(plan: RunPlan, parallel: Parallel) -> list[torch.nn.Module]:
    """This pipeline stage's model chunks, wrapped in megatron-core's DDP.

    A fresh start loads the weights of --load here; a resumed run gets them (with the
    optimizer's state) from its checkpoint later, in `restore`.

    Args:
        plan: the checked run (architecture, parallel layout, precision, --load).
        parallel: this rank's place in the process grid and its device.

    Returns:
        One chunk, or one per virtual pipeline stage, with the layers and core attention of
        `plan.attention`.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megasft.megatron.attention import gradient_accumulation_fusion_available
    from megasft.megatron.builder import build_model, transformer_config
    from megasft.megatron.weights import load_weights

    config, attention = plan.config, plan.attention
    bf16 = config.precision == "bf16"
    model_config = transformer_config(
        plan.architecture,
        tensor_parallel_size=config.tensor_parallel,
        pipeline_parallel_size=config.pipeline_parallel,
        expert_parallel_size=config.expert_parallel,
        expert_tensor_parallel_size=config.expert_tensor_size,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Every weight is then loaded, but megatron-core marks tensor-parallel weights (the
        # attribute its gradient norm and clipping read) only while initialising them.
        perform_initialization=True,
        overrides=dict(
            context_parallel_size=config.context_parallel,
            virtual_pipeline_model_parallel_size=config.virtual_pipeline_stages,
            sequence_parallel=uses_sequence_parallel(config, parallel, plan.architecture),
            **layer_settings(plan),
            # loss_func returns (sum, count): megatron-core divides the gradients by the
            # number of target tokens of the whole global batch (see step.py)
            calculate_per_token_loss=True,
            # Weight gradients accumulate into main_grad inside the GEMM: Transformer Engine's
            # layers do it themselves, but megatron-core's own (the output layer among them)
            # raise at construction unless Apex's fused_weight_gradient_mlp_cuda imports
            gradient_accumulation_fusion=attention.transformer_engine_layers
            and gradient_accumulation_fusion_available(),
            # Frees a stage's output once sent, keeping only what backward needs. Not on
            # CPU: gloo may still be reading the freed memory of an asynchronous send.
            deallocate_pipeline_outputs=parallel.on_accelerator,
            # The interleaved schedule with separate, overlapped sends and receives (as
            # Megatron-LM runs it): the batched form posts two messages to the same peer at
            # PP=2 (its previous and next stage), which gloo matches the wrong way round.
            overlap_p2p_comm=bool(config.virtual_pipeline_stages),
            batch_p2p_comm=not config.virtual_pipeline_stages,
        )
        | moe_settings(config, plan.architecture),  # MoE models only
    )
    chunks = [
        build_model(
            plan.architecture,
            model_config,
            vp_stage=stage if config.virtual_pipeline_stages else None,
            transformer_engine=attention.transformer_engine_layers,
            attention=attention.backend,
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
    peft = config.peft_settings
    # Weights only: a fine-tuning start. A PEFT run's checkpoints hold its adapters only, so
    # its frozen base always comes from --load (restore checks it is the same base).
    if plan.resume_from is None or peft is not None:
        load_weights(chunks, Path(config.load))
    if peft is not None:
        from megasft.megatron.peft import method_named

        for chunk in chunks:
            method_named(peft.method).apply(chunk, peft, seed=config.seed)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.on_accelerator,
        use_distributed_optimizer=plan.distributed_optimizer,
    )
    model = [
        DistributedDataParallel(model_config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    # The schedule finds these hooks on the model's config.
    model_config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if ddp_config.overlap_grad_reduce and len(model) > 1:
        model_config.grad_sync_func = [m.start_grad_sync for m in model]
    model_config.finalize_model_grads_func = finalize_model_grads
    return model


def setup_optimizer(plan: RunPlan, model: list[torch.nn.Module]) -> Any:
    """AdamW over `model` with gradient clipping, as megatron-core's (mixed-precision,
    optionally distributed) optimizer.

    Args:
        plan: the learning rate, Adam's settings, clipping, precision, and whether the
            optimizer is distributed.
        model: the DDP-wrapped chunks of `setup_model`.

    Returns:
        megatron-core's MegatronOptimizer (or ChainedOptimizer).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = plan.config
    bf16 = config.precision == "bf16"
    return get_megatron_optimizer(
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
            use_distributed_optimizer=plan.distributed_optimizer,
        ),
        model,
    )


def setup_scheduler(config: TrainConfig, optimizer: Any) -> Any:
    """The learning rate of each step: linear warmup from 0, then cosine to min_lr at the last
    step. Step s (0-based) trains at the rate for s + 1, so that the first step does not waste
    a batch at rate 0 (the loop calls `scheduler.step(1)` before each step).

    Args:
        config: lr, min_lr, warmup_iters, train_iters, weight_decay.
        optimizer: the optimizer whose rate it sets.

    Returns:
        megatron-core's OptimizerParamScheduler at step 0 (`setup` moves it to a resumed
        run's applied updates: a skipped step does not advance the schedule).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
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
