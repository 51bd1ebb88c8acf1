"""`megasft convert`: the command line of the checkpoint-convert stage.

`ConvertConfig` declares its settings (megasft.settings makes one flag of each) and hands them
to `megasft.checkpoint.convert.convert`, the stage's entry point.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass

# Only light imports here: the root parser is built for every `megasft` command, and the
# converter (torch, torch.distributed.checkpoint) costs seconds to import.
from megasft.checkpoint.layout import DEFAULT_MAX_SHARD_BYTES, FORMATS
from megasft.settings import add_options, given_settings, raise_problems, setting, setting_problems


def parse_size(text: str) -> int:
    """Bytes in a size such as `5GB`, `500MB`, `2GiB` or `1000000`.

    Args:
        text: a number, optionally followed by a decimal (KB...TB) or binary (KiB...TiB) unit.

    Returns:
        The size in bytes.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 5GB, 500MB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    multipliers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    multipliers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * multipliers[unit])


@dataclass(frozen=True)
class ConvertConfig:
    """The settings of one conversion, as `convert()` takes them."""

    source_format: str = setting(help="The format of --src.", flag="--from", choices=FORMATS)
    target_format: str = setting(help="The format to write.", flag="--to", choices=FORMATS)
    src: str = setting(help="The checkpoint directory to read.", metavar="SRC")
    dst: str = setting(help="The directory to create (must not exist).", metavar="DST")
    base: str | None = setting(
        None,
        "--to hf: HF model directory to take config.json, generation_config.json and the "
        "tokenizer from (default: the copies stored in the megatron checkpoint).",
        metavar="BASE",
    )
    allow_pytorch_bin: bool = setting(
        False,
        "--from hf: read pytorch_model.bin weights (with torch.load(weights_only=True)) when "
        "there are no safetensors.",
    )
    max_shard_bytes: int = setting(
        DEFAULT_MAX_SHARD_BYTES,
        "--to hf: largest safetensors shard in bytes, or with a unit, e.g. 5GB or 500MB.",
        flag="--max-shard-size",
        metavar="SIZE",
        parse=parse_size,
        at_least=1,
    )

    adapter_only: bool = setting(
        False,
        "--from megatron of a PEFT (LoRA) run: write a Hugging Face PEFT adapter "
        "(adapter_config.json, adapter_model.safetensors) instead of the merged model; "
        "needs --base.",
    )

    def __post_init__(self) -> None:
        problems = setting_problems(self)
        if self.adapter_only and self.base is None:
            problems.append(
                "--adapter-only needs --base: the Hugging Face model the adapter applies to"
            )
        raise_problems(problems)


def add_convert_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `convert` on the root parser's subparsers.

    Args:
        subparsers: what `add_subparsers` returned on the root parser.
    """
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face and megatron-core",
        description=(
            "Convert model weights between a Hugging Face directory (config.json, safetensors, "
            "tokenizer) and a megatron-core dist_checkpointing checkpoint loadable at any TP/PP. "
            "Families: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3."
        ),
    )
    add_options(parser, ConvertConfig)
    parser.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Convert with the parsed flags and print what was converted; returns the exit code."""
    from megasft.checkpoint.convert import convert

    config = ConvertConfig(**given_settings(ConvertConfig, args))
    started = time.monotonic()
    architecture = convert(
        config.source_format,
        config.target_format,
        config.src,
        config.dst,
        base=config.base,
        allow_pytorch_bin=config.allow_pytorch_bin,
        max_shard_bytes=config.max_shard_bytes,
        adapter_only=config.adapter_only,
    )
    print(
        f"converted {config.src} ({architecture.family}, {architecture.num_layers} layers, hidden "
        f"{architecture.hidden_size}, vocab {architecture.vocab_size}) {config.source_format} -> "
        f"{config.target_format} in {time.monotonic() - started:.1f}s: {config.dst}"
    )
    return 0
