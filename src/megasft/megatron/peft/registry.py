"""The registry of PEFT methods, by the name `--peft` takes.

A method module defines a `PeftMethod` subclass and decorates it with `@register`; importing
`megasft.megatron.peft` imports every method module. No torch import here, so settings can
be checked before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from megasft.errors import ConfigError

ADAPTER_MODULE = "adapter"
"""Every method keeps its trainable tensors in submodules of this name: a checkpoint key with
`.adapter.` in it is an adapter tensor (see megasft.train.checkpointing)."""


@dataclass(frozen=True)
class PeftSettings:
    """What a method is asked to do (from TrainConfig's --peft and --lora-* settings)."""

    method: str
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        """The factor on the adapter's output: alpha / rank, as Hugging Face PEFT has it."""
        return self.alpha / self.rank


class PeftMethod:
    """One PEFT method: how it checks its settings and how it adapts a model."""

    name: ClassVar[str]
    targets: ClassVar[tuple[str, ...]]
    """The megatron-core linears (by their attribute name in a layer) it can adapt."""

    def problems(self, settings: PeftSettings) -> list[str]:
        """Problems with `settings` for this method, each naming the setting (none: [])."""
        unknown = [target for target in settings.targets if target not in self.targets]
        found = []
        if unknown:
            found.append(
                f"--lora-targets: unknown target(s) {', '.join(unknown)}; "
                f"known: {', '.join(self.targets)}"
            )
        if not settings.targets:
            found.append("--lora-targets: name at least one linear to adapt")
        return found

    def model_problems(self, settings: PeftSettings, architecture: Any) -> list[str]:
        """Problems with `settings` for the model `architecture` (a ModelArchitecture), each
        naming the setting (none: [])."""
        return []

    def apply(self, chunk: Any, settings: PeftSettings, *, seed: int) -> None:
        """Wrap `chunk`'s targets with adapters (in place) and freeze everything else."""
        raise NotImplementedError

    def adapter_shapes(
        self, settings: PeftSettings, *, rows: int, columns: int, split_dim: int, parts: int
    ) -> dict[str, tuple[int, ...]]:
        """The trainable tensors the method adds to one target linear, as one rank holds them
        (`megasft plan` counts them).

        Args:
            settings: the method's settings.
            rows, columns: the linear's whole weight shape [out, in].
            split_dim: the dimension tensor parallelism splits the weight along.
            parts: the tensor-parallel size.

        Returns:
            Shape by name under the adapter module, in registration order.
        """
        raise NotImplementedError

    def adapter_kept(self, settings: PeftSettings, *, inputs: float) -> tuple[float, bool]:
        """What one target linear's adapter keeps for backward, per token (`megasft plan`
        counts it).

        Args:
            settings: the method's settings.
            inputs: the width of the linear's input on this rank.

        Returns:
            (elements kept besides the linear's input, whether it keeps that input).
        """
        raise NotImplementedError


_METHODS: dict[str, PeftMethod] = {}


def register(method_class: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: register one instance of `method_class` under its `name`.

    Args:
        method_class: a `PeftMethod` subclass.

    Returns:
        `method_class`, unchanged.

    Raises:
        ValueError: another method has that name.
    """
    if method_class.name in _METHODS:
        raise ValueError(f"PEFT method {method_class.name!r} is registered twice")
    _METHODS[method_class.name] = method_class()
    return method_class


def method_names() -> tuple[str, ...]:
    """The registered methods' names, sorted (the choices of `--peft`)."""
    return tuple(sorted(_METHODS))


def method_named(name: str) -> PeftMethod:
    """The method registered under `name`.

    Raises:
        ConfigError: no method has that name.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"--peft {name!r}: unknown method; known: {', '.join(method_names())}"
        ) from None
