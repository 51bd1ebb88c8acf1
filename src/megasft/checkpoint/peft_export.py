"""A PEFT run's checkpoint (adapters only) -> a merged Hugging Face model, or a Hugging Face
PEFT adapter that `peft.PeftModel.from_pretrained(base, OUT)` loads.

megatron-core's fused linears carry one adapter each: linear_qkv's B rows are q, k and v
blocks (interleaved per query group, as the weight's are) and linear_fc1's B is [gate; up].
Split row-wise by the family's weight table, with A shared, they are PEFT's separate
q/k/v and gate/up adapters, exactly: B_q A is the q rows of B A. The output layer's adapter is
PEFT's `lm_head` one, B without its vocabulary-padding rows. See docs/peft.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from megasft.checkpoint import mappings
from megasft.checkpoint.dist_checkpoint_io import DistCheckpointReader
from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.layout import peft_settings_of
from megasft.checkpoint.tensor_bytes import DTYPES, FileBytes, MemoryBytes
from megasft.constants import ARCHITECTURE_FILE
from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.families.weight_mapping import (
    VOCAB_PADDED,
    FusedGateUp,
    FusedQKV,
    TensorMapping,
)
from megasft.megatron.peft.lora import weight_name

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
"""PeftModel wraps the HF model: its keys are the model's under this prefix."""


def hf_adapters(checkpoint: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every adapter of the checkpoint as HF module name -> (A [r, in], B [out, r]), fp32.

    A and B are read from the optimizer's fp32 main weights when the run trained in bf16.
    """
    architecture = ModelArchitecture.load(checkpoint / ARCHITECTURE_FILE)
    settings = peft_settings_of(checkpoint)
    reader = DistCheckpointReader(checkpoint)
    table = {mapping.megatron: mapping for mapping in mappings.mappings_for(architecture)}
    adapters = {}
    for target in settings["targets"]:
        mapping = table[weight_name(target)]
        key = mappings.stacked_key(mapping.megatron).removesuffix("weight") + "adapter."
        a_all, b_all = (_read_fp32(reader, key + part) for part in ("lora_a", "lora_b"))
        if not mappings.is_layer_mapping(mapping):  # the output layer: one adapter, no stack
            a_all, b_all = a_all[None], b_all[None]
        for index, layer in enumerate(mappings.layers_of(mapping, architecture)):
            modules = [mappings.hf_name(name, layer, None).removesuffix(".weight") for name in
                       mapping.hf_names]  # fmt: skip
            for module, rows in zip(modules, _row_blocks(mapping, architecture), strict=True):
                adapters[module] = (a_all[index], b_all[index][rows])
    return adapters


def _row_blocks(mapping: TensorMapping, architecture: ModelArchitecture) -> list[Any]:
    """Per HF tensor of `mapping`, the rows of the fused megatron output it is made of."""
    if isinstance(mapping, FusedQKV):
        blocks = mappings.qkv_blocks(architecture)
        return [
            torch.cat(
                [
                    torch.arange(b.fused_first_row, b.fused_first_row + b.rows)
                    for b in blocks
                    if b.part == part
                ]
            )  # fmt: skip
            for part in range(3)
        ]
    if isinstance(mapping, FusedGateUp):
        return list(mappings.gate_up_rows(architecture))
    if mapping.megatron in VOCAB_PADDED:  # the output layer: B's padding rows are not HF's
        return [slice(0, architecture.vocab_size)]
    return [slice(None)]


def _read_fp32(reader: DistCheckpointReader, key: str) -> torch.Tensor:
    main = f"optimizer.state.fp32_param.{key}"
    return _read(reader, main if main in reader.tensors else key).float()


def _read(reader: DistCheckpointReader, key: str) -> torch.Tensor:
    if key not in reader.tensors:
        raise CheckpointError(f"{reader.directory}: no tensor {key}; not a LoRA checkpoint?")
    stored = reader.tensors[key]
    source = reader.read(key, (0,) * len(stored.shape), tuple(stored.shape))
    if isinstance(source, FileBytes):
        with open(source.path, "rb") as file:
            file.seek(source.offset)
            data = bytearray(file.read(source.length))
    elif isinstance(source, MemoryBytes):
        data = bytearray(source.data)
    else:
        data = bytearray(source.length)
    dtype = getattr(torch, DTYPES[stored.dtype].torch_name)
    return torch.frombuffer(data, dtype=dtype).reshape(tuple(stored.shape)).clone()


def write_peft_adapter(checkpoint: Path, destination: Path, base: Path) -> None:
    """Write a Hugging Face PEFT LoRA adapter of `checkpoint` into `destination`.

    Args:
        checkpoint: a PEFT run's iter_* directory.
        destination: the (empty, staging) directory to write into.
        base: the HF model the adapter applies to (named in adapter_config.json).
    """
    from safetensors.torch import save_file

    settings = peft_settings_of(checkpoint)
    adapters = hf_adapters(checkpoint)
    tensors = {}
    for module, (a, b) in adapters.items():
        tensors[f"{PEFT_KEY_PREFIX}{module}.lora_A.weight"] = (
            a.clone()
        )  # q, k, v share A: one copy each
        tensors[f"{PEFT_KEY_PREFIX}{module}.lora_B.weight"] = b.clone()
    save_file(tensors, str(destination / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in adapters}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    (destination / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_merged_model(checkpoint: Path, destination: Path, base: Path) -> None:
    """Write the HF model `base` with the adapters of `checkpoint` merged into its weights:
    W + (alpha / r) B A, computed in fp32 and cast to the base's dtype.

    Args:
        checkpoint: a PEFT run's iter_* directory.
        destination: the (empty, staging) directory to write into.
        base: the HF model the run's --load was converted from.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    settings = peft_settings_of(checkpoint)
    scaling = settings["alpha"] / settings["rank"]
    adapters = hf_adapters(checkpoint)
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"--base {base}: no *.safetensors weights to merge into")
    merged = set()
    for file in files:
        tensors = {}
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = weights.get_tensor(name)
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module in adapters:
                    a, b = adapters[module]
                    tensor = (tensor.float() + scaling * (b @ a)).to(tensor.dtype)
                    merged.add(module)
                tensors[name] = tensor
        save_file(tensors, str(destination / file.name), metadata={"format": "pt"})
    missing = sorted(set(adapters) - merged)
    if missing:
        raise CheckpointError(
            f"--base {base} has no weight for adapter(s) {missing[:3]}; is it the model the "
            "run's --load was converted from?"
        )
    for path in base.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, destination / path.name)
