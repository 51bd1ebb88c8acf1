"""Reading fields of a Hugging Face `config.json`: typed, with errors that name the field.

`ConfigReader` is what a model family (`megasft.megatron.families`) reads its settings with;
`read_rope` reads the RoPE settings every supported family shares. `Llama3RopeScaling` and
`MoEArchitecture` are the parts of a `ModelArchitecture` that some families read (they live
here so that family modules can build them). Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megasft.errors import ConfigError


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1-style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    """How much the low frequencies are slowed down."""
    low_freq_factor: float
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled."""
    high_freq_factor: float
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int
    """The context length the model was pre-trained with before scaling."""


@dataclass(frozen=True)
class MoEArchitecture:
    """The mixture-of-experts blocks of a model: routed experts, no shared expert."""

    num_experts: int
    """Routed experts per MoE layer (HF `num_experts` or `num_local_experts`)."""
    router_topk: int
    """Experts each token is routed to (HF `num_experts_per_tok`)."""
    expert_ffn_hidden_size: int
    """Width of each expert's gated MLP (HF `moe_intermediate_size`, Mixtral
    `intermediate_size`)."""
    normalize_topk: bool
    """The top-k routing weights are divided by their sum (HF `norm_topk_prob`; Mixtral
    always); otherwise they are the softmax over all experts, as selected."""
    moe_layers: tuple[int, ...]
    """The layers whose MLP is the MoE block; the others have a dense MLP of
    `ModelArchitecture.ffn_hidden_size`."""
    aux_loss_coeff: float
    """HF `router_aux_loss_coef`: the trainer's default load-balancing loss coefficient."""

    def __post_init__(self) -> None:
        if not 1 <= self.router_topk <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.router_topk}) must be between 1 and the number of "
                f"experts ({self.num_experts})"
            )
        if not self.moe_layers:
            raise ConfigError(
                "the model has no MoE layer (see decoder_sparse_step, mlp_only_layers)"
            )


class ConfigReader:
    """Typed access to the fields of a config.json dict, with errors that name the field."""

    _MISSING = object()

    def __init__(self, config: dict[str, Any], source: str) -> None:
        """Args:
        config: the parsed config.json.
        source: what to call it in errors (its path, usually).
        """
        self.config = config
        self.source = source

    def get(self, field: str, kind: type, default: Any = _MISSING) -> Any:
        """The value of `field`, checked to be a `kind` (an int is accepted as a float).

        Args:
            field: the config.json field.
            kind: the type it must have: int, float, bool or str.
            default: returned when the field is missing or null; without one, it is required.

        Returns:
            The value (or `default`).

        Raises:
            ConfigError: the field is required and missing, or of another type.
        """
        value = self.config.get(field)
        if value is None:
            if default is self._MISSING:
                raise ConfigError(f"{self.source}: required field {field!r} is missing")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(
                f"{self.source}: field {field!r} must be {kind.__name__}, got {value!r}"
            )
        return value


def read_rope(reader: ConfigReader) -> tuple[float, Llama3RopeScaling | None]:
    """The RoPE base frequency and scaling of a config, in either style of config.json.

    Args:
        reader: the config.

    Returns:
        (rope_theta, the Llama 3.1 scaling or None for plain RoPE).

    Raises:
        ConfigError: a RoPE type other than default and llama3, a partial rotary factor,
            or a llama3 scaling without one of its parameters.
    """
    # transformers 5 writes `rope_parameters` (theta inside); older configs write `rope_theta`
    # and `rope_scaling`.
    parameters = reader.config.get("rope_parameters")
    field = "rope_parameters"
    if parameters is None:
        parameters = reader.config.get("rope_scaling")
        field = "rope_scaling"
    parameters = dict(parameters or {})
    theta = parameters.get("rope_theta", reader.get("rope_theta", float, default=10000.0))
    if parameters.get("partial_rotary_factor", 1.0) != 1.0 or reader.config.get(
        "partial_rotary_factor", 1.0
    ) not in (None, 1.0):
        raise ConfigError(f"{reader.source}: partial_rotary_factor other than 1.0 is not supported")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(
            f"{reader.source}: {field}.rope_type {rope_type!r} is not supported "
            "(supported: default, llama3)"
        )
    try:
        scaling = Llama3RopeScaling(
            factor=float(parameters["factor"]),
            low_freq_factor=float(parameters["low_freq_factor"]),
            high_freq_factor=float(parameters["high_freq_factor"]),
            original_max_position_embeddings=int(parameters["original_max_position_embeddings"]),
        )
    except KeyError as error:
        raise ConfigError(f"{reader.source}: {field} needs {error.args[0]!r} for llama3") from error
    return float(theta), scaling
