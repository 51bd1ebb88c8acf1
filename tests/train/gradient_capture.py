"""Captures the gradients of a training step as megatron-core finishes them, for the tests.

`install()` wraps megatron-core's `finalize_model_grads`, which the trainer gives the pipeline
schedule: it reduces the gradients over data-parallel ranks (and the tied embedding over
pipeline stages), then divides them by the target tokens of the global batch. Right after it,
inside `capturing(directory)`, every rank gathers its tensor-parallel shards and the first
data-parallel rank of each pipeline stage writes `directory/gradients_rank<R>.pt`:
{global megatron name: fp32 gradient}, before clipping or any optimizer step. Runs in the
worker processes only (megatron-core's CPU emulation is process-wide).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

_target: dict[str, Path | None] = {"directory": None}


def install() -> None:
    """Wrap `megatron.core.distributed.finalize_model_grads` (before the trainer imports it)."""
    import megatron.core.distributed as distributed

    original = distributed.finalize_model_grads
    if getattr(original, "captures_gradients", False):
        return

    def finalize_and_capture(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        directory = _target["directory"]
        if directory is not None:
            _write(model, directory)
            _target["directory"] = None  # the first step only
        return result

    finalize_and_capture.captures_gradients = True
    distributed.finalize_model_grads = finalize_and_capture


@contextlib.contextmanager
def capturing(directory: Path):
    """Capture the gradients of the first step run inside this block into `directory`."""
    _target["directory"] = directory
    try:
        yield
    finally:
        _target["directory"] = None


def _write(model_chunks, directory: Path) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tensor_size = parallel_state.get_tensor_model_parallel_world_size()
    gradients = {}
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)  # inside megatron-core's DDP wrapper
        for name, parameter in module.named_parameters():
            gradient = parameter.main_grad.detach().float().clone()
            if getattr(parameter, "tensor_model_parallel", False) and tensor_size > 1:
                shards = [torch.empty_like(gradient) for _ in range(tensor_size)]
                dist.all_gather(shards, gradient.contiguous(), group=group)
                gradient = torch.cat(shards, dim=parameter.partition_dim)
            gradients[_global_name(module, name)] = gradient
    if parallel_state.get_data_parallel_rank() == 0 and (
        parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(gradients, directory / f"gradients_rank{dist.get_rank()}.pt")


def _global_name(module, name: str) -> str:
    """`name` with its layer numbered over the whole model, not within this pipeline stage."""
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if not match:
        return name
    layer = module.decoder.layers[int(match.group(1))].layer_number - 1
    return f"decoder.layers.{layer}.{match.group(2)}"


def read(directory: Path) -> dict:
    """Every captured gradient of a run, merged over its pipeline stages."""
    import torch

    gradients = {}
    for path in sorted(Path(directory).glob("gradients_rank*.pt")):
        gradients.update(torch.load(path))
    return gradients
