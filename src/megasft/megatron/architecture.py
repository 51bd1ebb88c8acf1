"""The architecture of a model, read from a Hugging Face `config.json`.

`ModelArchitecture` is what megasft needs to know to build the megatron-core model and to map
its weights: one frozen dataclass (with `MoEArchitecture` for mixture-of-experts models), saved
as JSON next to every megatron checkpoint megasft writes. `architecture_from_hf_config` reads it from a `config.json` dict, with the help of the
model's family (`megasft.megatron.families`), and refuses anything the megatron-core model
could not reproduce exactly, naming the config field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megasft.constants import HF_CONFIG_FILE
from megasft.errors import ConfigError
from megasft.megatron import families
from megasft.megatron.hf_config import ConfigReader, Llama3RopeScaling, MoEArchitecture

__all__ = [
    "Llama3RopeScaling",
    "ModelArchitecture",
    "MoEArchitecture",
    "architecture_from_hf_config",
    "hf_config_from_architecture",
    "padded_vocab_size",
    "read_hf_config",
]

VOCAB_PADDING_MULTIPLE = 128
"""The embedding and output layer are padded to a multiple of this many rows. Megatron-core
shards the vocabulary across tensor-parallel ranks, so the padded size must be divisible by
TP; a fixed multiple of 128 keeps one checkpoint loadable at every power-of-two TP up to 128
(megatron-LM instead pads to make_vocab_size_divisible_by * TP, which ties a checkpoint to a
TP size)."""


@dataclass(frozen=True)
class ModelArchitecture:
    """A decoder-only transformer of one of the supported families, as megasft builds it."""

    family: str
    """Hugging Face `model_type`, naming a registered family (`megasft.megatron.families`)."""
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
    moe: MoEArchitecture | None = None
    """The mixture-of-experts blocks (Mixtral, Qwen3-MoE); None for a dense model."""

    def __post_init__(self) -> None:
        if self.family not in families.names():
            raise ConfigError(f"family {self.family!r} is not one of {', '.join(families.names())}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_query_groups})"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError("padded_vocab_size is smaller than vocab_size")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.moe is not None and not set(self.moe.moe_layers) <= set(range(self.num_layers)):
            raise ConfigError(
                f"MoE layers {self.moe.moe_layers} outside the {self.num_layers} layers"
            )

    @property
    def stacked_layers(self) -> bool:
        """Whether every layer has the same parameters, so that megatron-core checkpoints
        stack them into one tensor per parameter with the layer as the leading axis. A model
        that mixes dense and MoE layers is saved with one key per layer
        (`decoder.layers.{layer}.…`) instead."""
        return self.moe is None or len(self.moe.moe_layers) == self.num_layers

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (from 0) has the MoE block instead of a dense MLP."""
        return self.moe is not None and layer in self.moe.moe_layers

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelArchitecture:
        fields = json.loads(text)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = Llama3RopeScaling(**fields["rope_scaling"])
        if fields.get("moe") is not None:
            moe = fields["moe"]
            fields["moe"] = MoEArchitecture(**moe | {"moe_layers": tuple(moe["moe_layers"])})
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
    path = Path(directory) / HF_CONFIG_FILE
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
    config: dict[str, Any], source: str = HF_CONFIG_FILE
) -> ModelArchitecture:
    """Read the architecture from a Hugging Face config dict.

    Args:
        config: the parsed config.json.
        source: what to call it in errors (its path, usually).

    Returns:
        The architecture, its family's settings read by the family (`megasft.megatron.families`).

    Raises:
        ConfigError: an unsupported model_type, architectures entry or setting, or a missing
            or mistyped field; the message names the field.
    """
    reader = ConfigReader(config, source)
    model_type = reader.get("model_type", str)
    if model_type not in families.names():
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(families.names())}"
        )
    family = families.family_named(model_type)
    architectures = config.get("architectures") or [family.hf_architecture_class]
    if architectures != [family.hf_architecture_class]:
        raise ConfigError(
            f"{source}: architectures is {architectures}; megasft converts causal language "
            f"models only ({family.hf_architecture_class})"
        )
    family.check_config(reader)
    fields = family.architecture_fields(reader)
    return ModelArchitecture(
        family=model_type,
        padded_vocab_size=padded_vocab_size(fields["vocab_size"]),
        **fields,
    )


def hf_config_from_architecture(architecture: ModelArchitecture) -> dict[str, Any]:
    """A minimal `config.json` for the architecture, readable by transformers 4.x and 5.x.

    Used only when neither the converted checkpoint nor `--base` carries the original
    config.json (which is always preferred, since it keeps token ids and other fields).

    Args:
        architecture: the model's architecture.

    Returns:
        The config.json fields, in the order they are written.
    """
    family = families.family_named(architecture.family)
    config: dict[str, Any] = {
        "architectures": [family.hf_architecture_class],
        "model_type": architecture.family,
        "vocab_size": architecture.vocab_size,
        "hidden_size": architecture.hidden_size,
        "intermediate_size": architecture.ffn_hidden_size,
        "num_hidden_layers": architecture.num_layers,
        "num_attention_heads": architecture.num_attention_heads,
        "num_key_value_heads": architecture.num_query_groups,
        "head_dim": architecture.head_dim,
        "hidden_act": family.hidden_act,
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
    return config | family.hf_config_fields(architecture)
