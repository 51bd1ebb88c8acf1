"""`megasft convert`: the command line of the checkpoint-convert stage."""

from __future__ import annotations

import argparse
import re
import time

# Only light imports here: the root parser is built for every `megasft` command, and the
# converter (torch, torch.distributed.checkpoint) costs seconds to import.
from megasft.checkpoint.layout import DEFAULT_MAX_SHARD_BYTES, FORMATS


def add_convert_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `convert` on the root parser's subparsers."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face and megatron-core",
        description=(
            "Convert model weights between a Hugging Face directory (config.json, safetensors, "
            "tokenizer) and a megatron-core dist_checkpointing checkpoint loadable at any TP/PP. "
            "Families: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3."
        ),
    )
    parser.add_argument("--from", dest="source_format", choices=FORMATS, required=True)
    parser.add_argument("--to", dest="target_format", choices=FORMATS, required=True)
    parser.add_argument("--src", required=True, help="the checkpoint directory to read")
    parser.add_argument("--dst", required=True, help="the directory to create (must not exist)")
    parser.add_argument(
        "--base",
        help="--to hf: HF model directory to take config.json, generation_config.json and the "
        "tokenizer from (default: the copies stored in the megatron checkpoint)",
    )
    parser.add_argument(
        "--allow-pytorch-bin",
        action="store_true",
        help="--from hf: read pytorch_model.bin weights (with torch.load(weights_only=True)) "
        "when there are no safetensors",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        metavar="SIZE",
        help="--to hf: largest safetensors shard, e.g. 5GB (default) or 500MB",
    )
    parser.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from megasft.checkpoint.convert import convert

    started = time.monotonic()
    architecture = convert(
        args.source_format,
        args.target_format,
        args.src,
        args.dst,
        base=args.base,
        allow_pytorch_bin=args.allow_pytorch_bin,
        max_shard_bytes=args.max_shard_size,
    )
    print(
        f"converted {args.src} ({architecture.family}, {architecture.num_layers} layers, hidden "
        f"{architecture.hidden_size}, vocab {architecture.vocab_size}) {args.source_format} -> "
        f"{args.target_format} in {time.monotonic() - started:.1f}s: {args.dst}"
    )
    return 0


def parse_size(text: str) -> int:
    """Bytes in a size such as `5GB`, `500MB`, `2GiB` or `1000000`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 5GB, 500MB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    multipliers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    multipliers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * multipliers[unit])
