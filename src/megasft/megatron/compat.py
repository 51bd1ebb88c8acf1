"""The megatron-core API differences between the versions megasft is tested on, in one place.

megasft is tested on megatron-core 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12); README,
"Supported versions". Each difference the rest of megasft meets is one function here, decided
by what the installed megatron-core has (a field, a function), never by comparing version
strings, and its comment names the versions. megatron-core is imported inside the functions
only, so this module imports without it (as `megasft.megatron.cpu` does).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

from megasft.errors import ConfigError

TESTED_MEGATRON_CORE_VERSIONS: tuple[str, ...] = ("0.16.1", "0.19.2")
"""megatron-core versions that megasft's tests (and its CPU emulation layer) were run against."""

_COMMON_STATE_FILE = "common.pt"
_DCP_METADATA_FILE = ".metadata"
_warned_untested: set[str] = set()


def installed_megatron_core_version() -> str:
    """The installed megatron-core version string (from the package metadata)."""
    return importlib.metadata.version("megatron-core")


def untested_version_message(version: str, where: str) -> str:
    """What to say about a megatron-core version outside `TESTED_MEGATRON_CORE_VERSIONS`."""
    tested = ", ".join(TESTED_MEGATRON_CORE_VERSIONS)
    return (
        f"megatron-core {version} is installed, but {where} was checked against {tested} only. "
        f"Install one of those (megatron-core=={TESTED_MEGATRON_CORE_VERSIONS[-1]} needs Python "
        "3.12), or read megasft/megatron/cpu.py (its CUDA redirects) and compat.py (the API "
        "differences) against the new version and add it to TESTED_MEGATRON_CORE_VERSIONS."
    )


def warn_if_untested(version: str | None = None) -> bool:
    """On the GPU path: say once per process (on stderr) when the installed megatron-core is
    not a tested version; training goes on. The CPU emulation layer refuses instead.

    Args:
        version: the version to check; the installed one by default.

    Returns:
        True when a warning was printed.
    """
    version = version or installed_megatron_core_version()
    if version in TESTED_MEGATRON_CORE_VERSIONS or version in _warned_untested:
        return False
    _warned_untested.add(version)
    print(f"megasft: warning: {untested_version_message(version, 'megasft')}", file=sys.stderr)
    return True


def version_specific_config_fields() -> dict[str, Any]:
    """`TransformerConfig` fields that every megasft model sets, named as the installed
    megatron-core names them.

    Per-layer CUDA graphs (never enabled by megasft) default to the "full" scope, which both
    versions deprecate with a warning on every config built; the empty list means the same and
    is silent. The field is `cuda_graph_scope` in 0.16.1 and `cuda_graph_modules` in 0.19.x
    (where `cuda_graph_scope` survives only as a deprecated alias that warns when set).

    Returns:
        Field names and values to pass to `TransformerConfig`.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {field.name for field in dataclasses.fields(TransformerConfig)}
    name = "cuda_graph_modules" if "cuda_graph_modules" in fields else "cuda_graph_scope"
    return {name: []}


def check_checkpoint_readable(checkpoint_dir: str | os.PathLike) -> None:
    """Refuse, with a message, a checkpoint the installed megatron-core cannot read.

    `dist_checkpointing.save` of megatron-core 0.16.1 writes the non-tensor state to
    common.pt; 0.19.x writes it into the DCP files (.metadata, *.distcp) and still reads
    common.pt. So 0.19.x reads both, and 0.16.1 fails on a training checkpoint that 0.19.x
    wrote (FileNotFoundError: common.pt). Converted checkpoints (`megasft convert`) have
    common.pt and load on both.

    Args:
        checkpoint_dir: a megatron checkpoint directory.

    Raises:
        ConfigError: the checkpoint has no common.pt and the installed megatron-core needs it.
    """
    path = Path(checkpoint_dir)
    if (path / _COMMON_STATE_FILE).is_file() or not (path / _DCP_METADATA_FILE).is_file():
        return  # readable by both, or not a DCP checkpoint (dist_checkpointing says why)
    if _reads_common_state_from_dcp_files():
        return
    raise ConfigError(
        f"{path} was written by megatron-core 0.19 or newer (it keeps its non-tensor state in "
        f"the checkpoint's DCP files, without {_COMMON_STATE_FILE}), which megatron-core "
        f"{installed_megatron_core_version()} cannot read; load it with megatron-core "
        f"{TESTED_MEGATRON_CORE_VERSIONS[-1]} (Python 3.12), or export it with `megasft "
        "convert --from megatron --to hf`, which reads either."
    )


def _reads_common_state_from_dcp_files() -> bool:
    # 0.19.x: `load_common_state_dict` falls back from common.pt to the "common_state" object in
    # the DCP files, and checks for the legacy file with this helper; 0.16.1 has no such helper.
    from megatron.core.dist_checkpointing import serialization

    return hasattr(serialization, "_legacy_common_state_exists")


def moe_layer_with_router(mlp_spec: Any, router: Any) -> Any:
    """The MoE layer spec `mlp_spec` of a transformer layer spec, building its router with
    `router`.

    megatron-core 0.16.1 describes the MoE layer as a `ModuleSpec` of `MoELayer`, 0.19.x as a
    `functools.partial` of it; both hold an `MoESubmodules`, whose `router` is replaced.

    Args:
        mlp_spec: the `mlp` of a layer spec built with experts.
        router: the router's builder (`config=`, `pg_collection=` keywords).

    Returns:
        A new spec of the same kind.
    """
    import functools

    if isinstance(mlp_spec, functools.partial):
        submodules = dataclasses.replace(mlp_spec.keywords["submodules"], router=router)
        return functools.partial(
            mlp_spec.func, *mlp_spec.args, **{**mlp_spec.keywords, "submodules": submodules}
        )
    return dataclasses.replace(
        mlp_spec, submodules=dataclasses.replace(mlp_spec.submodules, router=router)
    )


def moe_layer_losses(name: str) -> Any:
    """The per-layer values megatron-core tracked under `name` this step (the load-balancing
    loss, coefficient removed, summed over micro-batches), or None when none were tracked.

    The tracker is a dict of {"values": ...} from `get_moe_layer_wise_logging_tracker` in
    0.16.1, and `get_moe_metrics_tracker().metrics` of entries with `.values` in 0.19.x.

    Args:
        name: the tracked name, e.g. "load_balancing_loss".

    Returns:
        A [num_layers] tensor, or None.
    """
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        entry = moe_utils.get_moe_metrics_tracker().metrics.get(name)
        return None if entry is None else entry.values
    entry = moe_utils.get_moe_layer_wise_logging_tracker().get(name)
    return None if entry is None else entry["values"]


def clear_moe_layer_losses() -> None:
    """Zero what `moe_layer_losses` reads, for the next step (see there for the versions)."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        moe_utils.get_moe_metrics_tracker().clear()
    else:
        moe_utils.clear_aux_losses_tracker()
