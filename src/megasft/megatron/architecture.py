"""The architecture of a model, read from a Hugging Face `config.json`.

`ModelArchitecture` is what megasft needs to know to build the megatron-core model and to map
its weights: one frozen dataclass, saved as JSON next to every megatron checkpoint megasft
writes. `architecture_from_hf_config` reads it from a `config.json` dict and refuses anything
the megatron-core model could not reproduce exactly, naming the config field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megasft.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Model families megasft converts and builds, by their Hugging Face `model_type`."""

HF_ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

VOCAB_PADDING_MULTIPLE = 128
"""The embedding and output layer are padded to a multiple of this many rows. Megatron-core
shards the vocabulary across tensor-parallel ranks, so the padded size must be divisible by
TP; a fixed multiple of 128 keeps one checkpoint loadable at every power-of-two TP up to 128
(megatron-LM instead pads to make_vocab_size_divisible_by * TP, which ties a checkpoint to a
TP size)."""


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
class ModelArchitecture:
    """A decoder-only transformer of one of the supported families, as megasft builds it."""

    family: str
    """Hugging Face `model_type`: llama, mistral, qwen2 or qwen3."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """Width of the gated MLP (HF `intermediate_size`)."""
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (HF `num_key_value_heads`); fewer than the query heads means GQA."""
    head_dim: int
    """Channels per attention head (megatron-core `kv_channels`)."""
    vocab_size: int
    """Rows of the Hugging Face embedding (the tokenizer's vocabulary, possibly padded by HF)."""
    padded_vocab_size: int
    """Rows of the megatron-core embedding and output layer; rows past `vocab_size` are zero."""
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    qkv_bias: bool
    """Biases on the query, key and value projections (Qwen2)."""
    qk_layernorm: bool
    """RMSNorm over head_dim on queries and keys before RoPE (Qwen3)."""
    tied_embeddings: bool
    """The output layer shares the embedding weights (HF `tie_word_embeddings`)."""
    sliding_window: int | None
    """Each token attends to at most this many tokens, itself included (Mistral); None: all."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_query_groups})"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError("padded_vocab_size is smaller than vocab_size")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")

    @property
    def hf_architecture_class(self) -> str:
        return HF_ARCHITECTURE_CLASSES[self.family]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelArchitecture:
        fields = json.loads(text)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = Llama3RopeScaling(**fields["rope_scaling"])
        return cls(**fields)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> ModelArchitecture:
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError as error:
            raise ConfigError(
                f"{path}: missing (every megasft megatron checkpoint has one)"
            ) from error
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{path}: not a valid model architecture: {error}") from error


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_PADDING_MULTIPLE) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`."""
    return -(-vocab_size // multiple) * multiple


def read_hf_config(directory: Path) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face model directory."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: missing; a Hugging Face model directory needs one") from error
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def architecture_from_hf_config(
    config: dict[str, Any], source: str = "config.json"
) -> ModelArchitecture:
    """Read the architecture from a Hugging Face config dict; `source` names it in errors."""
    reader = _ConfigReader(config, source)
    family = reader.get("model_type", str)
    if family not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    architectures = config.get("architectures") or [HF_ARCHITECTURE_CLASSES[family]]
    if architectures != [HF_ARCHITECTURE_CLASSES[family]]:
        raise ConfigError(
            f"{source}: architectures is {architectures}; megasft converts causal language "
            f"models only ({HF_ARCHITECTURE_CLASSES[family]})"
        )
    if reader.get("hidden_act", str, default="silu") != "silu":
        raise ConfigError(f"{source}: hidden_act must be 'silu' for {family}")
    for field in ("attention_bias", "mlp_bias"):
        if family != "qwen2" and reader.get(field, bool, default=False):
            raise ConfigError(
                f"{source}: {field} is true; megatron-core's GPTModel cannot add biases to "
                "these projections alone, so such models are not supported"
            )
    _refuse_sliding_layers(reader, family)

    hidden_size = reader.get("hidden_size", int)
    num_attention_heads = reader.get("num_attention_heads", int)
    vocab_size = reader.get("vocab_size", int)
    rope_theta, rope_scaling = _rope(reader)
    return ModelArchitecture(
        family=family,
        num_layers=reader.get("num_hidden_layers", int),
        hidden_size=hidden_size,
        ffn_hidden_size=reader.get("intermediate_size", int),
        num_attention_heads=num_attention_heads,
        num_query_groups=reader.get("num_key_value_heads", int, default=num_attention_heads),
        head_dim=reader.get("head_dim", int, default=hidden_size // num_attention_heads),
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size(vocab_size),
        max_position_embeddings=reader.get("max_position_embeddings", int),
        norm_epsilon=reader.get("rms_norm_eps", float, default=1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        tied_embeddings=reader.get("tie_word_embeddings", bool, default=False),
        sliding_window=_sliding_window(reader, family),
    )


def hf_config_from_architecture(architecture: ModelArchitecture) -> dict[str, Any]:
    """A minimal `config.json` for the architecture, readable by transformers 4.x and 5.x.

    Used only when neither the converted checkpoint nor `--base` carries the original
    config.json (which is always preferred, since it keeps token ids and other fields)."""
    config: dict[str, Any] = {
        "architectures": [architecture.hf_architecture_class],
        "model_type": architecture.family,
        "vocab_size": architecture.vocab_size,
        "hidden_size": architecture.hidden_size,
        "intermediate_size": architecture.ffn_hidden_size,
        "num_hidden_layers": architecture.num_layers,
        "num_attention_heads": architecture.num_attention_heads,
        "num_key_value_heads": architecture.num_query_groups,
        "head_dim": architecture.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": architecture.max_position_embeddings,
        "rms_norm_eps": architecture.norm_epsilon,
        "rope_theta": architecture.rope_theta,
        "tie_word_embeddings": architecture.tied_embeddings,
    }
    if architecture.rope_scaling is not None:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            **dataclasses.asdict(architecture.rope_scaling),
        }
    if architecture.family == "mistral":
        config["sliding_window"] = architecture.sliding_window
    if architecture.family in ("llama", "qwen3"):
        config["attention_bias"] = False
    return config


class _ConfigReader:
    """Typed access to config fields, with errors that name the field."""

    _MISSING = object()

    def __init__(self, config: dict[str, Any], source: str) -> None:
        self.config = config
        self.source = source

    def get(self, field: str, kind: type, default: Any = _MISSING) -> Any:
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


def _rope(reader: _ConfigReader) -> tuple[float, Llama3RopeScaling | None]:
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


def _refuse_sliding_layers(reader: _ConfigReader, family: str) -> None:
    if family in ("qwen2", "qwen3") and reader.get("use_sliding_window", bool, default=False):
        raise ConfigError(
            f"{reader.source}: use_sliding_window is true; sliding-window layers of {family} "
            "(max_window_layers) are not supported"
        )
    layer_types = reader.config.get("layer_types") or []
    if any(layer_type != "full_attention" for layer_type in layer_types):
        raise ConfigError(
            f"{reader.source}: layer_types has layers other than full_attention; not supported"
        )


def _sliding_window(reader: _ConfigReader, family: str) -> int | None:
    if family != "mistral":
        return None
    window = reader.get("sliding_window", int, default=None)
    if window is not None and window >= reader.get("max_position_embeddings", int):
        return None  # a window covering every position changes nothing
    return window
