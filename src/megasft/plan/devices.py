"""Device memory: how many bytes one accelerator gives the plan to fill.

The table holds the memory each device reports to the framework (`torch.cuda.mem_get_info`
on an idle device), in GiB: AMD's MI300X and MI325X report their HBM as 192 and 256 GiB;
NVIDIA's H100 80GB and H200 141GB report about 79.2 and 139.8 GiB, less than the GB of their
names. Any other device: `--device-memory GIB`.
"""

from __future__ import annotations

from megasft.errors import ConfigError

GIB = 1024**3

DEVICE_MEMORY_GIB: dict[str, float] = {
    "mi300x": 192.0,
    "mi325x": 256.0,
    "h100": 79.2,
    "h200": 139.8,
}
"""Memory per device in GiB, by the device's lower-case name."""

DEFAULT_DEVICE = "mi300x"
"""The device megasft's recipes are written for."""


def device_memory_bytes(device: str | None, memory_gib: float | None = None) -> tuple[str, int]:
    """The device's name and memory, from the table or as given.

    Args:
        device: a name of `DEVICE_MEMORY_GIB` (any case), or None for the default device.
        memory_gib: the memory per device in GiB; overrides the table (any device name).

    Returns:
        (the device's name for the report, its memory in bytes).

    Raises:
        ConfigError: an unknown device without `memory_gib`, or a memory that is not positive.
    """
    name = (device or DEFAULT_DEVICE).lower()
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ConfigError(f"--device-memory must be positive, got {memory_gib}")
        return name, int(memory_gib * GIB)
    if name not in DEVICE_MEMORY_GIB:
        raise ConfigError(
            f"--device {device!r} is not in the table ({', '.join(DEVICE_MEMORY_GIB)}); "
            "give its memory with --device-memory GIB"
        )
    return name, int(DEVICE_MEMORY_GIB[name] * GIB)
