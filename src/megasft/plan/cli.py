"""`megasft plan`: will this training run fit on its GPUs? Answered before anything starts.

    megasft plan --config recipes/llama2-7b-sft-mi300x.yaml --seq-length 4096
        --model /models/Llama-2-7b-hf [--device mi300x | --device-memory GIB] [--json]

It takes `megasft train`'s settings (a recipe with --config, and the same flags; --data gives
the sequence length, --load the model), plus --model and --seq-length. It prints each GPU's
memory by part, and exits 0 when the run fits, 1 when it does not (naming the changes that
would fit), 2 for a bad setting. docs/plan.md says how each part is counted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megasft.constants import ARCHITECTURE_FILE, HF_CONFIG_FILE
from megasft.errors import ConfigError, InputError
from megasft.megatron.architecture import ModelArchitecture, architecture_from_hf_config
from megasft.plan.devices import DEFAULT_DEVICE, DEVICE_MEMORY_GIB, device_memory_bytes
from megasft.plan.layout import layout_from_config
from megasft.plan.memory import MemoryPlan, plan_memory
from megasft.train.config import TrainConfig, check_against_experts

DOES_NOT_FIT_EXIT_CODE = 1


def model_architecture(path: str | Path) -> ModelArchitecture:
    """The architecture of a model given as a Hugging Face directory, its config.json, or a
    converted megatron checkpoint (its directory or its architecture.json).

    Args:
        path: where the model is.

    Returns:
        Its architecture.

    Raises:
        InputError: nothing readable there.
        ConfigError: a config megasft cannot build (an unsupported family or setting).
    """
    path = Path(path)
    if path.is_dir():
        if (path / ARCHITECTURE_FILE).is_file():
            return ModelArchitecture.load(path / ARCHITECTURE_FILE)
        path = path / HF_CONFIG_FILE
    if not path.is_file():
        raise InputError(
            f"--model {path}: no such file; give a Hugging Face model directory, its "
            f"{HF_CONFIG_FILE}, or a converted checkpoint (with {ARCHITECTURE_FILE})"
        )
    if path.name == ARCHITECTURE_FILE:
        return ModelArchitecture.load(path)
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"--model {path}: not valid JSON ({error})") from error
    return architecture_from_hf_config(config, str(path))


def plan_run(
    config: TrainConfig,
    architecture: ModelArchitecture,
    seq_length: int,
    *,
    device: str | None = None,
    device_memory_gib: float | None = None,
    accelerator: bool = True,
) -> MemoryPlan:
    """The memory plan of a training run.

    Args:
        config: the run's settings.
        architecture: the model.
        seq_length: tokens per row.
        device: a device of the table (default: `DEFAULT_DEVICE`).
        device_memory_gib: memory per device, for a device not in the table.
        accelerator: plan the GPU path (else the CPU one).

    Returns:
        The plan.

    Raises:
        ConfigError: a layout the model cannot take (as the trainer checks it too), or an
            unknown device.
    """
    check_against_experts(config, architecture)
    name, memory = device_memory_bytes(device, device_memory_gib)
    return plan_memory(
        architecture, layout_from_config(config, seq_length, accelerator=accelerator), name, memory
    )


def add_plan_command(subparsers) -> None:
    from megasft.train.cli import add_train_arguments

    parser = subparsers.add_parser(
        "plan",
        help="per-GPU memory of a training run, and whether it fits, before it starts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a Hugging Face model directory, its config.json, or a converted checkpoint "
        "(default: --load)",
    )
    parser.add_argument(
        "--seq-length", type=int, metavar="N", help="tokens per row (default: --data's)"
    )
    parser.add_argument(
        "--device",
        metavar="NAME",
        help=f"one of {', '.join(DEVICE_MEMORY_GIB)} (default {DEFAULT_DEVICE})",
    )
    parser.add_argument(
        "--device-memory", type=float, metavar="GIB", help="memory per device, for others"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="plan megatron-core's CPU path (local layers, gloo)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_train_arguments(parser)
    parser.set_defaults(handler=run_plan_command)


def run_plan_command(args: argparse.Namespace) -> int:
    from megasft.data.store import read_manifest
    from megasft.plan.report import plan_record, report
    from megasft.train.cli import config_from_args

    model = args.model or args.load
    if not model:
        raise ConfigError("give the model with --model (or a converted checkpoint with --load)")
    seq_length = args.seq_length
    if seq_length is None:
        if not args.data:
            raise ConfigError("give --seq-length, or --data with a prepared dataset")
        seq_length = int(read_manifest(args.data)["settings"]["seq_length"])
    # The run's outputs and its length do not change its memory.
    for name in ("data", "load", "save"):
        if getattr(args, name) is None:
            setattr(args, name, ".")
    if args.train_iters is None and args.epochs is None:
        args.epochs = 1.0  # replaces a recipe's train_iters or epochs; the steps do not matter
    config = config_from_args(args)
    plan = plan_run(
        config,
        model_architecture(model),
        seq_length,
        device=args.device,
        device_memory_gib=args.device_memory,
        accelerator=not args.cpu,
    )
    if args.json:
        print(json.dumps(plan_record(plan), indent=2))
    else:
        print(report(plan), end="")
    return 0 if plan.fits else DOES_NOT_FIT_EXIT_CODE
