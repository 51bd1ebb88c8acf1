"""LoRA trainings for tests/train/test_lora.py, run as train_worker.py runs its own:

    python lora_worker.py lora_single WORK [SCENARIO ...]
    torchrun --nproc-per-node 2 lora_worker.py lora_parallel WORK [...]

Each scenario is `train_worker.run` with --peft lora (rank 4, alpha 8, every target: the four
linears of each layer and the output layer) and a larger learning rate (adapters start at
zero: B = 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.train import train_worker  # noqa: E402

TARGETS = "linear_qkv,linear_proj,linear_fc1,linear_fc2,output_layer"
LORA = dict(
    peft="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=TARGETS, lr=1e-2,
    min_lr=1e-3,
)  # fmt: skip


def lora(save: Path, inputs: dict, **settings) -> dict:
    result = train_worker.run(save, inputs, **{**LORA, **settings})
    result["checkpoint"] = str(save / f"iter_{len(result.get('losses', [])):07d}")
    return result


def _tensor_keys(checkpoint: Path) -> list[str]:
    """The tensors a distributed checkpoint holds. Its byte entries are left out: megatron-core
    0.19 stores its common (non-tensor) state as one (`common_state/shard_0_1`), 0.16 does not."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return sorted(key for key, entry in entries.items() if isinstance(entry, TensorStorageMetadata))


def trainable(save: Path, inputs: dict) -> dict:
    """What the optimizer holds and what a checkpoint holds, after 1 step."""
    import torch.distributed as dist

    lora(save, inputs, train_iters=1, warmup_iters=0)
    if dist.get_rank():
        return {}
    state = json.loads((save / "iter_0000001" / "train_state.json").read_text())
    metadata = json.loads((save / "iter_0000001" / "metadata.json").read_text())
    keys = _tensor_keys(save / "iter_0000001")
    return {"peft": state["peft"], "keys": keys, "metadata": metadata}


def resume_in_process(save: Path, inputs: dict) -> dict:
    """6 steps with a checkpoint at 2 and 4; the step-4 and -6 checkpoints removed, as if the
    run had died after step 3, and the run resumed from step 2: the same losses."""
    import shutil

    settings = dict(train_iters=6, save_interval=2)
    first = lora(save, inputs, **settings)
    for step in (4, 6):
        shutil.rmtree(save / f"iter_{step:07d}")
    again = lora(save, inputs, **settings)
    return {"first": first["losses"], "again": again["losses"], "steps": again["steps"]}


def other_base(save: Path, inputs: dict) -> dict:
    """A checkpoint resumed against a copy of the base with one file changed: refused."""
    import shutil

    from megasft.errors import ConfigError

    lora(save / "run", inputs, train_iters=1, warmup_iters=0)
    changed = save / "changed_base"
    shutil.copytree(inputs["mcore_model"], changed)
    (changed / "architecture.json").write_text((changed / "architecture.json").read_text() + "\n")
    try:
        # the checkpoint's own --train-iters: a changed schedule would be refused first
        train_worker.run(save / "run", {**inputs, "mcore_model": str(changed)}, **LORA,
                         train_iters=1, warmup_iters=0)  # fmt: skip
    except ConfigError as error:
        return {"refused": str(error)}
    return {"refused": None}


def megatron_logits(checkpoint: str, inputs: dict, **layout) -> dict:
    """megatron's own logits of a LoRA checkpoint (the base from --load, the adapters from the
    checkpoint) on 24 tokens, at the TP of `layout` and with every rank's logits gathered
    ([1, 24, vocab] on each rank: the output layer's adapter gathers its vocabulary too)."""
    import torch
    from megatron.core import dist_checkpointing

    from megasft.constants import ARCHITECTURE_FILE
    from megasft.megatron.architecture import ModelArchitecture
    from megasft.megatron.builder import build_model, transformer_config
    from megasft.megatron.peft import method_named
    from megasft.megatron.weights import load_weights
    from megasft.train.checkpointing import _model_state_dict
    from megasft.train.config import TrainConfig
    from megasft.train.distributed import setup_parallel, teardown_parallel

    config = TrainConfig(data="d", load="l", save="s", train_iters=1,
                         nproc=int(os.environ.get("WORLD_SIZE", "1")), **LORA, **layout)  # fmt: skip
    architecture = ModelArchitecture.load(Path(inputs["mcore_model"]) / ARCHITECTURE_FILE)
    parallel = setup_parallel(config)
    try:
        model = build_model(architecture, transformer_config(architecture), parallel_output=False)
        load_weights(model, inputs["mcore_model"])
        method_named("lora").apply(model, config.peft_settings, seed=1234)
        adapters = _model_state_dict([model], adapters_only=True)
        model.load_state_dict(dist_checkpointing.load(adapters, checkpoint)["model"],
                              strict=False)  # fmt: skip
        tokens = torch.arange(3, 27)[None]  # [1, 24]
        with torch.no_grad():
            logits = model(tokens, torch.arange(24)[None], None)  # [1, 24, padded vocab]
    finally:
        teardown_parallel(parallel)
    return {"tokens": tokens, "logits": logits[..., : architecture.vocab_size]}


def trained_and_forward(save: Path, inputs: dict) -> dict:
    """The reference run, then megatron's own logits of its last checkpoint, for the export
    test and the TP2 one."""
    import torch

    result = lora(save, inputs)
    torch.save(megatron_logits(result["checkpoint"], inputs), save / "megatron_logits.pt")
    result["logits"] = str(save / "megatron_logits.pt")
    return result


def tp2(save: Path, inputs: dict) -> dict:
    """TP2 training; then megatron's logits of its last checkpoint at TP2, gathered."""
    import torch
    import torch.distributed as dist

    result = lora(save, inputs, tensor_parallel=2)
    last = save / f"iter_{train_worker.COMMON['train_iters']:07d}"
    logits = megatron_logits(str(last), inputs, tensor_parallel=2)
    if dist.get_rank():
        return {}
    torch.save(logits, save / "megatron_logits.pt")
    result["logits"] = str(save / "megatron_logits.pt")
    return result


def bf16(save: Path, inputs: dict) -> dict:
    """bf16: the base stays bf16 and frozen; fp32 main weights exist for the adapters only."""
    import torch.distributed as dist

    result = lora(save, inputs, precision="bf16", train_iters=2, warmup_iters=0)
    if dist.get_rank():
        return {}
    result["keys"] = _tensor_keys(save / "iter_0000002")
    return result


SINGLE = {
    "reference": trained_and_forward,
    "trainable": trainable,
    "resume_in_process": resume_in_process,
    "other_base": other_base,
    "bf16": bf16,
}


def distributed_optimizer_resume(save: Path, inputs: dict) -> dict:
    """DP2 with the distributed optimizer (the GPU default): 4 steps, checkpoints at 2 and
    4; the step-4 one removed and the run resumed from step 2: the same losses."""
    import shutil

    import torch.distributed as dist

    settings = dict(train_iters=4, save_interval=2, distributed_optimizer=True)
    first = lora(save, inputs, **settings)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(save / "iter_0000004")
    dist.barrier()
    again = lora(save, inputs, **settings)
    if dist.get_rank():
        return {}
    return {"first": first["losses"], "again": again["losses"]}


PARALLEL = {
    "tp2": tp2,
    "dp2": lambda save, inputs: lora(save, inputs),
    "pp2": lambda save, inputs: lora(save, inputs, pipeline_parallel=2),
    "dp2_distributed_optimizer_resume": distributed_optimizer_resume,
}

if __name__ == "__main__":
    train_worker.main({"lora_single": SINGLE, "lora_parallel": PARALLEL})
