"""Runs several trainings in one process (or one torchrun job) for the tests in this folder.

Every launch pays ~10 s of imports, so each mode runs a list of scenarios in turn, each a
real `megasft.train.recipe.train` call with its own --save directory, and writes what the
tests compare into WORK/results_<mode>.json:

    python train_worker.py single WORK [SCENARIO ...]                # one process
    torchrun --nproc-per-node 2 train_worker.py parallel WORK [...]  # two processes, gloo

and the same with modes moe_single and moe_parallel for the mixture-of-experts model
(lora_worker.py adds lora_single and lora_parallel). All modes share one WORK, whose
workspace.json names the inputs (see workspace.py); each writes under WORK/<mode>. The tests
never switch megatron-core's CPU emulation on in the pytest process; it is process-wide.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

# Nothing heavy at module level: megatron-core's checkpoint writer starts a helper process
# with the "spawn" method, which imports this module again.

OVERFIT_STEPS = 70
COMMON = dict(
    precision="fp32",
    lr=1e-3,
    min_lr=1e-4,
    warmup_iters=1,
    global_batch_size=8,
    micro_batch_size=2,
    train_iters=5,
    seed=1234,
)


def main(modes: dict[str, dict] | None = None) -> None:
    """Runs the scenarios of the mode named on the command line.

    Args:
        modes: {mode: {scenario: function}}; this module's modes by default (lora_worker.py
            passes its own).
    """
    import torch.distributed as dist

    from tests.train import gradient_capture

    mode, work = sys.argv[1], Path(sys.argv[2])
    inputs = json.loads((work / "workspace.json").read_text())
    gradient_capture.install()
    if not dist.is_initialized():  # one group for every scenario; each training reuses it
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if modes is None:
        modes = {
            "single": SINGLE,
            "parallel": PARALLEL,
            "moe_single": MOE_SINGLE,
            "moe_parallel": MOE_PARALLEL,
        }
    scenarios = modes[mode]
    if sys.argv[3:]:  # a chosen few, when debugging
        scenarios = {name: scenarios[name] for name in sys.argv[3:]}
    results = {}
    for name, scenario in scenarios.items():
        try:
            results[name] = scenario(work / mode / name, inputs)
        except Exception as error:  # recorded, so one failure does not hide the others
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()
            if dist.get_world_size() > 1:  # the other rank may wait in a collective forever
                (work / f"results_{mode}_rank{dist.get_rank()}.json").write_text(
                    json.dumps(results, indent=2)
                )
                os._exit(1)
        if dist.get_rank() == 0:
            (work / f"results_{mode}.json").write_text(json.dumps(results, indent=2))
    dist.barrier()


def run(
    save: Path, inputs: dict, data: str = "packed", model: str = "mcore_model", **settings
) -> dict:
    """Train with COMMON settings (overridden by `settings`); the metrics of every step."""
    import torch.distributed as dist

    from megasft.train.config import TrainConfig
    from megasft.train.recipe import train
    from tests.train.records import read_metrics

    config = TrainConfig(
        data=inputs[data],
        load=inputs[model],
        save=str(save),
        nproc=int(os.environ.get("WORLD_SIZE", "1")),
        **{**COMMON, **settings},
    )
    summary = train(config)
    if dist.get_rank():
        return {}
    records = read_metrics(save / "metrics.jsonl")
    return {
        "steps": [record["step"] for record in records],
        "losses": [record["loss"] for record in records],
        "lrs": [record["lr"] for record in records],
        "grad_norms": [record["grad_norm"] for record in records],
        "skipped": [record["skipped"] for record in records],
        "target_tokens": [record["target_tokens"] for record in records],
        "tokens": [record["tokens"] for record in records],
        "val": [(record["step"], record["val_loss"]) for record in records if "val_loss" in record],
        "events": read_metrics(events) if (events := save / "events.jsonl").is_file() else [],
        "routing": [
            {key: value for key, value in record.items() if key.startswith("moe_")}
            for record in records
        ],
        "flops": [
            record.get("tflops_per_device", 0) * record["step_seconds"] for record in records
        ],
        "summary": {key: summary[key] for key in ("status", "skipped_steps", "final_loss")},
    }


def gradients(save: Path, inputs: dict, capture: bool = True, **settings) -> dict:
    """One step of the sharp model (see workspace.py) on the first global batch; its gradients
    as megatron-core finished them (see gradient_capture.py), unless `capture` is False."""
    from tests.train import gradient_capture

    settings = {"model": "sharp_mcore_model", "train_iters": 1, "warmup_iters": 0, **settings}
    if not capture:
        return run(save, inputs, **settings)
    with gradient_capture.capturing(save / "gradients"):
        result = run(save, inputs, **settings)
    return {**result, "gradients": str(save / "gradients")}


def validation(save: Path, inputs: dict) -> dict:
    """Validation loss every 2 steps; the test recomputes the last with transformers."""
    result = run(save, inputs, data="with_val", train_iters=4, eval_interval=2)
    result["checkpoint"] = str(save / "iter_0000004")
    return result


def resume_in_process(save: Path, inputs: dict) -> dict:
    """One process, the (non-distributed) optimizer of CPU runs: SIGTERM to itself after step
    3, then a second run on the same --save; and the same settings uninterrupted."""
    import signal
    import threading
    import time

    from megasft.train.recipe import Preempted
    from tests.train.records import read_metrics

    settings = dict(train_iters=6, save_interval=2, eval_interval=0)
    uninterrupted = run(save / "uninterrupted", inputs, **settings)

    def send_sigterm_after_step_3():
        metrics = save / "interrupted" / "metrics.jsonl"
        while not (metrics.is_file() and len(read_metrics(metrics)) >= 3):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_after_step_3, daemon=True).start()
    try:
        run(save / "interrupted", inputs, **settings)
        preempted_at = None
    except Preempted as stopped:
        preempted_at = stopped.checkpoint.name
    resumed = run(save / "interrupted", inputs, **settings)
    return {
        "preempted_at": preempted_at,
        "uninterrupted": uninterrupted["losses"],
        "resumed": resumed["losses"],
    }


def bf16_resume(save: Path, inputs: dict) -> dict:
    """bf16 (fp32 main weights in the optimizer): 4 steps with checkpoints at 2 and 4; then the
    step-4 checkpoint is removed, as if the run had died after step 3, and the run resumes
    from step 2."""
    import shutil

    settings = dict(precision="bf16", train_iters=4, save_interval=2)
    first = run(save, inputs, **settings)
    shutil.rmtree(save / "iter_0000004")
    again = run(save, inputs, **settings)
    return {"first": first["losses"], "again": again["losses"]}


def resume_with_another_layout(save: Path, inputs: dict) -> dict:
    """DP=2 for 4 steps, checkpoints at 2 and 4; the step-4 checkpoint removed, the run resumed
    at TP=2 (the non-distributed optimizer's state is resharded); then resumes that must be
    refused: another --train-iters, and a distributed-optimizer checkpoint at another --tp."""
    import shutil

    import torch.distributed as dist

    from megasft.errors import ConfigError

    settings = dict(train_iters=4, save_interval=2)
    first = run(save / "reshard", inputs, **settings)
    if dist.get_rank() == 0:
        shutil.rmtree(save / "reshard" / "iter_0000004")
    dist.barrier()
    resumed = run(save / "reshard", inputs, tensor_parallel=2, **settings)

    def refusal(directory: Path, **changed) -> str | None:
        try:
            run(directory, inputs, **{**settings, **changed})
        except ConfigError as error:
            return str(error)
        return None

    run(save / "distributed", inputs, distributed_optimizer=True, **settings)
    return {
        "first": first.get("losses"),
        "resumed": resumed.get("losses"),
        "train_iters_changed": refusal(save / "reshard", train_iters=6),
        "distributed_at_tp2": refusal(
            save / "distributed", distributed_optimizer=True, tensor_parallel=2
        ),
    }


DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)


def dropout_resume(save: Path, inputs: dict) -> dict:
    """Dropout on: 4 steps with checkpoints at 2 and 4; then the step-4 checkpoint is removed
    and the run resumes from step 2, whose saved RNG states must give the same masks."""
    import shutil

    settings = dict(train_iters=4, save_interval=2, **DROPOUT)
    first = run(save, inputs, **settings)
    shutil.rmtree(save / "iter_0000004")
    again = run(save, inputs, **settings)
    return {"first": first["losses"], "again": again["losses"]}


def with_nan_steps(steps: str, function, *args, **kwargs):
    from megasft.train.recipe import INJECT_NAN_ENV

    os.environ[INJECT_NAN_ENV] = steps
    try:
        return function(*args, **kwargs)
    finally:
        del os.environ[INJECT_NAN_ENV]


def stopped(save: Path, inputs: dict, nan_steps: str, **settings) -> dict:
    from megasft.train.recipe import TrainingStopped

    try:
        with_nan_steps(nan_steps, run, save, inputs, **settings)
    except TrainingStopped as error:
        return {"stopped": str(error)}
    return {"stopped": None}


SINGLE = {
    # test 1 and the reference curve of test 2: TP = PP = DP = 1, 4 micro-batches per step
    "reference": lambda save, inputs: run(save, inputs),
    # test 3: all 48 examples in one step, packed 16 rows vs one example per row
    "packed_all": lambda save, inputs: run(
        save, inputs, global_batch_size=24, micro_batch_size=4, train_iters=1, warmup_iters=0
    ),
    "unpacked_all": lambda save, inputs: run(
        save,
        inputs,
        data="unpacked",
        global_batch_size=48,
        micro_batch_size=8,
        train_iters=1,
        warmup_iters=0,
    ),
    # test 5: 16 examples, the whole set every step
    "overfit": lambda save, inputs: run(
        save,
        inputs,
        data="overfit",
        global_batch_size=16,
        micro_batch_size=8,
        train_iters=OVERFIT_STEPS,
        lr=5e-3,
        min_lr=5e-3,  # constant after the warmup
        warmup_iters=3,
        clip_grad=1.0,
        log_interval=5,
    ),
    "validation": validation,
    # dropout: the masks follow megatron-core's RNG tracker, and resume exactly
    "hidden_dropout": lambda save, inputs: run(save, inputs, hidden_dropout=0.1),
    "dropout": lambda save, inputs: run(save, inputs, **DROPOUT),
    "dropout_resume": dropout_resume,
    "resume_in_process": resume_in_process,
    "bf16_resume": bf16_resume,
    # test 6: an injected NaN is skipped and counted; too many in a row stop the run
    "nan_skipped": lambda save, inputs: with_nan_steps("3", run, save, inputs, train_iters=6),
    "nan_in_a_row": lambda save, inputs: stopped(
        save, inputs, "2,3,4", train_iters=6, max_bad_steps=3
    ),
    "nan_policy_stop": lambda save, inputs: stopped(
        save, inputs, "2", train_iters=4, nan_policy="stop"
    ),
    "all_masked": lambda save, inputs: run(save, inputs, data="all_masked", train_iters=2),
    # a micro-batch without targets contributes nothing: all rows, one per micro-batch, with
    # the first row's mask cleared, give the loss and gradients of the others alone
    "first_row_masked": lambda save, inputs: run(
        save,
        inputs,
        data="first_row_masked",
        global_batch_size=48,
        micro_batch_size=1,
        train_iters=1,
        warmup_iters=0,
    ),
    # test_gradients.py: step 1 against plain PyTorch, at 4, 1 and 8 micro-batches per step
    "gradients": gradients,
    "gradients_one_micro_batch": lambda save, inputs: gradients(save, inputs, micro_batch_size=8),
    "gradients_unpacked": lambda save, inputs: gradients(
        save, inputs, data="unpacked", micro_batch_size=1
    ),
    "first_row_dropped": lambda save, inputs: run(
        save,
        inputs,
        data="first_row_dropped",
        global_batch_size=47,
        micro_batch_size=1,
        train_iters=1,
        warmup_iters=0,
    ),
}


def cross_entropy_parity(save: Path, inputs: dict) -> dict:
    """At TP=2: step.loss_func on vocabulary shards equals masked_token_loss on the gathered
    logits, for a real batch and for one without targets (0, 0, finite gradients)."""
    import numpy as np
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megasft.constants import ARCHITECTURE_FILE
    from megasft.data.store import open_split, read_manifest
    from megasft.megatron.architecture import ModelArchitecture
    from megasft.megatron.builder import build_model, transformer_config
    from megasft.megatron.weights import load_weights
    from megasft.train.config import TrainConfig
    from megasft.train.data import collate
    from megasft.train.distributed import setup_parallel, teardown_parallel
    from megasft.train.loss import masked_token_loss
    from megasft.train.step import bshd_inputs, loss_func

    config = TrainConfig(
        data=inputs["packed"], load=inputs["mcore_model"], save=str(save), nproc=2,
        tensor_parallel=2, **COMMON,
    )  # fmt: skip
    parallel = setup_parallel(config)
    try:
        architecture = ModelArchitecture.load(Path(inputs["mcore_model"]) / ARCHITECTURE_FILE)
        model = build_model(
            architecture,
            transformer_config(architecture, tensor_parallel_size=2, perform_initialization=False),
        )
        load_weights(model, inputs["mcore_model"])
        seq_length = read_manifest(inputs["packed"])["settings"]["seq_length"]
        batch = collate(open_split(inputs["packed"]), np.arange(4), seq_length, 0)
        results = {}
        for name, loss_mask in (("real", batch.loss_mask), ("no_targets", 0 * batch.loss_mask)):
            micro = bshd_inputs(
                type(batch)(**{**batch.__dict__, "loss_mask": loss_mask}), parallel.device
            )
            logits = model(micro.tokens, micro.position_ids, micro.attention_mask)
            gathered = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            expected_sum, expected_count = masked_token_loss(
                gathered[..., : architecture.vocab_size].detach(), micro.tokens, loss_mask
            )
            loss_sum, count, _ = loss_func(micro, architecture.vocab_size, logits.clone())
            model.zero_grad()
            loss_sum.backward()
            finite = all(
                torch.isfinite(p.grad).all().item()
                for p in model.parameters()
                if p.grad is not None
            )
            results[name] = {
                "sum": loss_sum.item(),
                "count": count.item(),
                "expected_sum": expected_sum.item(),
                "expected_count": expected_count.item(),
                "finite_gradients": finite,
                "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            }
        return results
    finally:
        teardown_parallel(parallel)


PARALLEL = {
    # test 2: the reference curve at other layouts, same global batch
    "tp2": lambda save, inputs: run(save, inputs, tensor_parallel=2),
    "pp2": lambda save, inputs: run(save, inputs, pipeline_parallel=2),
    "dp2": lambda save, inputs: run(save, inputs),
    "dp2_distributed_optimizer": lambda save, inputs: run(save, inputs, distributed_optimizer=True),
    "pp2_interleaved": lambda save, inputs: run(
        save, inputs, pipeline_parallel=2, virtual_pipeline_stages=2
    ),
    "cross_entropy_parity": cross_entropy_parity,
    # test_gradients.py: step 1 against plain PyTorch (2 micro-batches per rank at DP=2)
    "gradients_tp2": lambda save, inputs: gradients(save, inputs, tensor_parallel=2),
    "gradients_pp2": lambda save, inputs: gradients(save, inputs, pipeline_parallel=2),
    "gradients_dp2": gradients,
    # the distributed optimizer keeps only its shard of the reduced gradients: the norm only
    "gradients_dp2_distributed_optimizer": lambda save, inputs: gradients(
        save, inputs, capture=False, distributed_optimizer=True
    ),
    "resume_with_another_layout": resume_with_another_layout,
    "tp2_hidden_dropout": lambda save, inputs: run(
        save, inputs, tensor_parallel=2, hidden_dropout=0.1
    ),
    "tp2_dropout": lambda save, inputs: run(save, inputs, tensor_parallel=2, **DROPOUT),
    # test 4: the uninterrupted run that the killed-and-resumed CLI run must reproduce
    "resume_reference": lambda save, inputs: run(
        save, inputs, train_iters=10, save_interval=2, distributed_optimizer=True
    ),
}


MOE_AUX_LOSS_COEFF = 0.1
"""Large enough that the load-balancing loss moves the gradient norm by about 1% (the tiny
model's config says 0.001)."""


def moe(save: Path, inputs: dict, aux_loss: bool = True, **settings) -> dict:
    coefficient = MOE_AUX_LOSS_COEFF if aux_loss else 0.0
    return run(save, inputs, model="mcore_moe_model", moe_aux_loss_coeff=coefficient, **settings)


MOE_SINGLE = {
    # the reference curves of the MoE layouts, with and without the load-balancing loss
    "moe_reference": lambda save, inputs: moe(save, inputs),
    "moe_reference_no_aux": lambda save, inputs: moe(save, inputs, aux_loss=False),
    # the coefficient from the model's config.json (router_aux_loss_coef)
    "moe_default_coefficient": lambda save, inputs: run(
        save, inputs, model="mcore_moe_model", train_iters=1, warmup_iters=0
    ),
    # test_gradients.py: step 1 against transformers' Qwen3-MoE (the load-balancing loss off:
    # transformers leaves it out of the loss)
    "gradients_moe": lambda save, inputs: gradients(
        save, inputs, model="mcore_moe_model", moe_aux_loss_coeff=0.0
    ),
    # LoRA on the attention projections, the experts and routers frozen
    "moe_lora": lambda save, inputs: moe(
        save, inputs, peft="lora", lora_targets="linear_qkv,linear_proj", lr=1e-2, min_lr=1e-2
    ),
}


def moe_resume_with_another_layout(save: Path, inputs: dict) -> dict:
    """DP=2 (EP=1) for 4 steps, checkpoints at 2 and 4; the step-4 checkpoint removed and the
    run resumed at TP=2 (ETP=2: each expert's matrices split; megatron-core reshards the
    experts and their regular optimizer state); then a resume at EP=2, which must be refused
    (the experts would get an optimizer of their own)."""
    import shutil

    import torch.distributed as dist

    from megasft.errors import ConfigError

    settings = dict(train_iters=4, save_interval=2)
    first = moe(save, inputs, **settings)
    if dist.get_rank() == 0:
        shutil.rmtree(save / "iter_0000004")
    dist.barrier()
    resumed = moe(save, inputs, tensor_parallel=2, **settings)
    try:
        moe(save, inputs, expert_parallel=2, **settings)
        refused = None
    except ConfigError as error:
        refused = str(error)
    if dist.get_rank():
        return {}
    return {"first": first["losses"], "resumed": resumed["losses"], "at_ep2": refused}


MOE_PARALLEL = {
    "moe_ep2": lambda save, inputs: moe(save, inputs, expert_parallel=2),
    "moe_ep2_no_aux": lambda save, inputs: moe(save, inputs, aux_loss=False, expert_parallel=2),
    "moe_ep2_allgather": lambda save, inputs: moe(
        save, inputs, expert_parallel=2, moe_token_dispatcher="allgather"
    ),
    "moe_tp2": lambda save, inputs: moe(save, inputs, tensor_parallel=2),
    "moe_tp2_no_aux": lambda save, inputs: moe(save, inputs, aux_loss=False, tensor_parallel=2),
    # attention split over TP, the experts over EP (not ETP) on the same two ranks
    "moe_tp2_etp1_ep2": lambda save, inputs: moe(
        save, inputs, tensor_parallel=2, expert_tensor_parallel=1, expert_parallel=2
    ),
    "moe_resume_with_another_layout": moe_resume_with_another_layout,
    # test_gradients.py: each rank holds half the experts; the gradient norm only
    "gradients_moe_ep2": lambda save, inputs: gradients(
        save,
        inputs,
        capture=False,
        model="mcore_moe_model",
        moe_aux_loss_coeff=0.0,
        expert_parallel=2,
    ),  # fmt: skip
}


if __name__ == "__main__":
    main()
