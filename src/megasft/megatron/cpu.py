"""Run unmodified megatron-core on a machine without an accelerator, over gloo.

megatron-core assumes CUDA throughout (device arguments, `.cuda()`, a CUDA RNG state per
tensor-parallel region, streams, `tensor.type()` compared with "torch.cuda.FloatTensor").
`enable_cpu_emulation()` redirects each assumption to the CPU; each redirect below is a
function with its reason, and docs/convert.md ("megatron-core on CPU") lists them all. It is
opt-in and refuses to run when an accelerator is present, so a GPU run is never changed, and
it refuses megatron-core versions outside `CHECKED_MEGATRON_CORE_VERSIONS` (0.16.1, 0.19.2),
because a new release can add a CUDA assumption that is not redirected. Collectives are not
replaced: gloo on torch 2.13 runs every one megatron-core uses here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megasft.errors import ConfigError
from megasft.megatron.compat import (
    TESTED_MEGATRON_CORE_VERSIONS,
    installed_megatron_core_version,
    untested_version_message,
)

CHECKED_MEGATRON_CORE_VERSIONS: tuple[str, ...] = TESTED_MEGATRON_CORE_VERSIONS
"""megatron-core versions whose CUDA assumptions were read and redirected by this module (the
tested versions: the GPU path warns about any other, see `compat.warn_if_untested`)."""

_CPU = torch.device("cpu")

# `Tensor.type()` names that megatron-core compares against, by dtype.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}

_lock = threading.Lock()
_enabled = False


def accelerator_present() -> bool:
    """True when torch sees a CUDA or ROCm device (ROCm builds report through `torch.cuda`)."""
    return torch.cuda.is_available()


def cpu_emulation_enabled() -> bool:
    """True once `enable_cpu_emulation()` has run in this process."""
    return _enabled


def check_megatron_core_version(version: str | None = None) -> None:
    """Refuse a megatron-core version whose CUDA assumptions were not checked."""
    version = version or installed_megatron_core_version()
    if version not in CHECKED_MEGATRON_CORE_VERSIONS:
        raise ConfigError(
            untested_version_message(version, "the CPU emulation layer (megasft/megatron/cpu.py)")
        )


def enable_cpu_emulation() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU for the rest of this process.

    Idempotent. Raises `ConfigError` when an accelerator is present (use it instead) or when
    the installed megatron-core version was not checked. Call it before building models;
    the device redirect applies to the calling thread, which is the thread that runs the
    model, the optimizer and the collectives.
    """
    global _enabled
    with _lock:
        if _enabled:
            return
        if accelerator_present():
            raise ConfigError(
                "an accelerator is present, so megasft will not emulate CUDA on the CPU; "
                "run on the GPU (the default), or hide it with CUDA_VISIBLE_DEVICES= for a "
                "CPU run"
            )
        check_megatron_core_version()
        # Import megatron-core (and with it torch._dynamo, through its `torch.compile`
        # decorators) before anything in `torch.cuda` is replaced: dynamo builds a table of
        # the original functions at import time.
        import megatron.core  # noqa: F401

        _redirect_cuda_functions()
        _redirect_cuda_rng_state()
        _redirect_moe_host_copies()
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_QuietRngForkWarning())
        _CudaDeviceAsCpu().__enter__()
        _enabled = True


# --- 1. device arguments, `.cuda()`, `.pin_memory()`, `.type()` ---------------------------------


def _as_cpu_if_cuda(device: Any) -> Any:
    """The CPU device for anything that names a CUDA device; anything else unchanged."""
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    # `torch.cuda.current_device()` returns an int on a GPU; code that cached one passes it.
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


class _CudaDeviceAsCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU ones on every torch call of this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _as_cpu_if_cuda(kwargs["device"])}
        if func is torch.Tensor.to:
            # Tensor.to(device, ...) or Tensor.to(other_tensor); dtypes pass through.
            args = (args[0], *(_as_cpu_if_cuda(a) if _names_device(a) else a for a in args[1:]))
        return func(*args, **kwargs)


def _names_device(value: Any) -> bool:
    return isinstance(value, str | torch.device) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


# --- 2. torch.cuda functions that raise on a CPU build ------------------------------------------


class _InertStream:
    """Stands in for `torch.cuda.Stream`: CPU work is synchronous, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _InertEvent:
        return event or _InertEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _InertEvent:
    """Stands in for `torch.cuda.Event`; `elapsed_time` is not meaningful and reports 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


@contextlib.contextmanager
def _inert_stream_context(stream: Any = None) -> Iterator[None]:
    yield


def _do_nothing() -> Callable[..., None]:
    """A fresh no-op function; each redirect gets its own object because torch._dynamo
    indexes `torch.cuda` functions by identity and rejects one object under two names."""

    def do_nothing(*args: Any, **kwargs: Any) -> None:
        return None

    return do_nothing


def _redirect_cuda_functions() -> None:
    default_stream = _InertStream()
    replacements: dict[str, Callable[..., Any] | type] = {
        "current_device": lambda: _CPU,
        "device_count": lambda: 1,
        "set_device": _do_nothing(),
        "synchronize": _do_nothing(),
        "empty_cache": _do_nothing(),
        "Stream": _InertStream,
        "Event": _InertEvent,
        "current_stream": lambda device=None: default_stream,
        "default_stream": lambda device=None: default_stream,
        "stream": _inert_stream_context,
    }
    for name, replacement in replacements.items():
        setattr(torch.cuda, name, replacement)
    for name in ("range_push", "range_pop", "mark"):
        setattr(torch.cuda.nvtx, name, _do_nothing())
    torch.cuda.nvtx.range = _inert_range_context


@contextlib.contextmanager
def _inert_range_context(*args: Any, **kwargs: Any) -> Iterator[None]:
    yield


# --- 3. the CUDA RNG state is the CPU default generator -----------------------------------------


def _get_cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.default_generator.set_state(new_state)


def _seed_cpu_generator() -> Callable[[int], None]:
    """A fresh seeding function (see `_do_nothing` for why each name gets its own object)."""

    def seed_cpu_generator(seed: int) -> None:
        # Not `torch.manual_seed`: that seeds CUDA too, which would call back into here.
        torch.default_generator.manual_seed(int(seed))

    return seed_cpu_generator


def _redirect_cuda_rng_state() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    # `torch.cuda.get_rng_state` is `torch.cuda.random.get_rng_state`: one object, two names,
    # as in torch itself.
    seed = _seed_cpu_generator()
    seed_all = _seed_cpu_generator()
    for module in (torch.cuda, torch.cuda.random):
        module.get_rng_state = _get_cpu_rng_state
        module.set_rng_state = _set_cpu_rng_state
        module.manual_seed = seed
        module.manual_seed_all = seed_all
    megatron_random._get_cuda_rng_state = _get_cpu_rng_state
    megatron_random._set_cuda_rng_state = _set_cpu_rng_state


class _QuietRngForkWarning(logging.Filter):
    """Drops the tracker's "CPU RNG state changed within GPU RNG context" warning, which under
    emulation only says that the CPU generator (standing in for the CUDA one) was used."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


# --- 4. the MoE dispatcher's device-to-host copies -----------------------------------------------


def _move_to_host(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> torch.Tensor | Any:
    """`maybe_move_tensor_to_cpu` for a machine whose every tensor is on the emulated device:
    a tensor is "moved" (it already is on the CPU) and, if asked, returned as numpy."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _redirect_moe_host_copies() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _move_to_host
    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_host
