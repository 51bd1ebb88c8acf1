"""One-shot check of megasft on a fresh CUDA or ROCm machine (`make gpu-check`).

    python bench/gpu_check.py [--wheels DIR] [--output DIR] [--dry-run]

For a machine without internet where torch is installed but megatron-core may not be:
`--wheels DIR` first installs every wheel in DIR (megatron-core's, ~2 MB; Transformer Engine
is optional and used where present) into OUTPUT/site and starts again with it on the path.
Then, in one run, on a random Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads in 8
key/value groups, SwiGLU 8192, vocabulary 128256, tied embeddings, Llama 3.1 RoPE scaling):

1. builds it with transformers on the device and converts it with `megasft convert`;
2. parity: megatron-core's logits against transformers' in fp32 and in bf16 (max abs diff),
   for each attention (torch, and Transformer Engine where installed);
3. trains 20 packed bf16 steps at sequence length 4096 through `megasft.train` for each
   attention, and checks step 1's loss against the same documents one per row (packed ==
   unpacked) on the device;
4. throughput: tokens/s, TFLOP/s and MFU of megasft and of a plain transformers loop (its
   fastest attention available, padding-free packed rows) on the same model, batches and
   sequence length, in this run.

It writes OUTPUT/gpu-check.json (`environment`, `parity`, `training`, `throughput` with
`megasft` and `transformers` entries carrying `tokens_per_second`) and OUTPUT/gpu-check.md (a
Markdown table against the goals). `--dry-run` runs the same code at tiny shapes on the CPU
(tests/test_gpu_check.py). See docs/train.md ("Checking a GPU machine").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALLED_WHEELS_ENV = "MEGASFT_GPU_CHECK_WHEELS"
"""Set by the restart after --wheels: the wheels installed, for the report."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="install these wheels first (no index)")
    parser.add_argument("--output", type=Path, default=Path("gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--work", type=Path, help="scratch space (default: a temporary dir)")
    parser.add_argument(
        "--checks", default="parity,training,transformers",
        help="which checks to run, comma-separated (default: all three)",
    )  # fmt: skip
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        install_wheels_and_restart(args.wheels, args.output)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
    sys.path.insert(0, str(REPO / "src"))
    import torch
    from gpu_check_runs import (
        LLAMA_1B,
        TINY,
        attentions,
        build_model,
        megasft_training,
        parity,
        transformers_training,
        write_datasets,
    )

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA/ROCm device; use --dry-run for the CPU")
    shape = TINY if args.dry_run else LLAMA_1B
    report = Report(args.output, {"environment": environment(), "shape": asdict(shape)})
    report.data["environment"]["dry_run"] = args.dry_run
    with tempfile.TemporaryDirectory(prefix="megasft-gpu-check-", dir=args.work) as scratch:
        work = Path(scratch)
        hf, mcore = build_model(work, shape)  # everything below needs it: no check without
        report.done("model built and converted")
        checks = set(args.checks.split(","))
        if "parity" in checks:
            report.attempt("parity", "logit parity", parity, hf, mcore, shape)
        data = write_datasets(work, shape)
        for attention in attentions() if "training" in checks else []:
            training = report.attempt(
                f"training.{attention}", f"megasft training, {attention} attention",
                megasft_training, work, data, mcore, shape, attention,
            )  # fmt: skip
            if training:
                # "megasft" is what `--attention auto` runs: the last of attentions()
                default = attention == attentions()[-1]
                name = "megasft" if default else f"megasft_{attention}_attention"
                report.put(f"throughput.{name}", training.pop("throughput"))
                report.put(f"training.{attention}", training)
        if "transformers" in checks:
            report.attempt(
                "throughput.transformers", "transformers training",
                transformers_training, hf, mcore, data, shape,
            )  # fmt: skip
    report.finish()
    print(report.markdown)
    if report.data.get("errors"):
        raise SystemExit(f"gpu_check: {len(report.data['errors'])} check(s) failed: "
                         f"{', '.join(report.data['errors'])} (see gpu-check.json)")  # fmt: skip


class Report:
    """gpu-check.json, written again after every phase, so that a run cut short (a timeout, a
    crash in a later phase) still leaves what it measured. A failing phase is recorded under
    `errors` with its traceback and the phases after it still run."""

    def __init__(self, output: Path, data: dict):
        self.output, self.data, self.started = output, data, time.perf_counter()
        self.markdown = ""

    def put(self, key: str, value) -> None:
        """Sets `a.b` in the report and writes it."""
        *parents, last = key.split(".")
        node = self.data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
        self.write()

    def attempt(self, key: str, what: str, function, *args):
        """function(*args) stored at `key`; None, with the error recorded, if it raises."""
        try:
            result = function(*args)
        except Exception:  # a check that fails is a result; the others still run
            self.put(f"errors.{what}", traceback.format_exc())
            print(f"gpu_check: {what} FAILED:\n{traceback.format_exc()}", flush=True)
            return None
        self.put(key, result)
        self.done(what)
        return result

    def done(self, what: str) -> None:
        print(f"gpu_check: {what} ({time.perf_counter() - self.started:.0f} s)", flush=True)

    def write(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        text = json.dumps(self.data, indent=2) + "\n"
        (self.output / "gpu-check.json").write_text(text)

    def finish(self) -> None:
        self.write()
        self.markdown = markdown(self.data)
        (self.output / "gpu-check.md").write_text(self.markdown)


def install_wheels_and_restart(wheels: Path, output: Path) -> None:
    """pip-install every wheel of `wheels` into OUTPUT/site, then run this script again with
    that folder on PYTHONPATH (and without --wheels)."""
    site = (output / "site").resolve()
    files = sorted(str(path) for path in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"gpu_check: no *.whl in {wheels}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--no-compile", "--upgrade", "--target", str(site), *files],
        check=True,
    )  # fmt: skip
    arguments, skip = [], False
    for argument in sys.argv[1:]:
        if skip or argument == "--wheels":
            skip = not skip
            continue
        if not argument.startswith("--wheels="):
            arguments.append(argument)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    names = os.pathsep.join(Path(file).name for file in files)
    environment = {**os.environ, "PYTHONPATH": path, INSTALLED_WHEELS_ENV: names}
    os.execve(sys.executable, [sys.executable, __file__, *arguments], environment)


def environment() -> dict:
    import importlib.metadata

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    from megasft.megatron.attention import (
        gradient_accumulation_fusion_available,
        transformer_engine_installed,
    )

    gpu = torch.cuda.is_available()
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "device_count": torch.cuda.device_count() if gpu else 0,
        "cpu_count": os.cpu_count(),
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
        "transformer_engine": version("transformer-engine") or version("transformer_engine"),
        "transformer_engine_importable": transformer_engine_installed(),
        "apex_gradient_accumulation_fusion": gradient_accumulation_fusion_available(),
        "installed_wheels": [
            name for name in os.environ.get(INSTALLED_WHEELS_ENV, "").split(os.pathsep) if name
        ],
    }


def markdown(report: dict) -> str:
    """The results as a Markdown table, each against its goal."""
    from gpu_check_runs import GOALS

    environment = report["environment"]
    lines = [
        f"megasft GPU check on {environment['device']} (torch {environment['torch']}, "
        f"megatron-core {environment['megatron_core']}, Transformer Engine "
        f"{environment['transformer_engine'] or 'not installed'}), {report['seconds']} s"
        + (" — dry run, tiny shapes on the CPU" if environment["dry_run"] else ""),
        "",
        "| check | result | goal |",
        "|---|---|---|",
    ]
    for precision, by_attention in report.get("parity", {}).items():
        for attention, result in by_attention.items():
            rounding = GOALS["bf16_rounding"]
            lines.append(
                f"| logits {precision}, {attention} attention: max abs diff from transformers "
                f"| {result['max_abs_diff']:.2e} | ≤ {result['goal']:g}"
                + (f", or the row below within {rounding:g}× |" if precision == "bf16" else " |")
            )
            if precision == "bf16" and "max_abs_diff_from_fp32" in result:
                lines.append(
                    f"| logits bf16 from transformers' fp32, {attention} attention: megatron-core"
                    f" vs transformers | {result['max_abs_diff_from_fp32']:.3g} vs "
                    f"{result['transformers_max_abs_diff_from_fp32']:.3g} | "
                    f"{'passed' if result['passed'] else 'FAILED'} |"
                )
    for attention, result in report.get("training", {}).items():
        lines.append(
            f"| step-1 loss packed vs unpacked, {attention} attention | "
            f"{result['packed_loss']:.5f} vs {result['unpacked_loss']:.5f} "
            f"({result['relative_difference']:.1e}) | ≤ {result['relative_tolerance']:g} "
            "relative |"
        )
        lines.append(
            f"| loss over {len(result['losses'])} steps, {attention} attention | "
            f"{result['losses'][0]:.4f} → {result['losses'][-1]:.4f} | finite |"
        )
        for kernel, loss in result.get("packed_loss_by_kernel", {}).items():
            if isinstance(loss, str):
                lines.append(f"| step-1 loss packed ({kernel} kernel) | FAILED: {loss} | |")
                continue
            difference = abs(loss - result["unpacked_loss"]) / result["unpacked_loss"]
            lines.append(
                f"| step-1 loss packed ({kernel} kernel) vs unpacked, {attention} attention | "
                f"{loss:.5f} ({difference:.1e}) | ≤ {result['relative_tolerance']:g} relative |"
            )
        if result.get("peak_memory_gib") is not None:
            lines.append(
                f"| peak GPU memory allocated in training, {attention} attention | "
                f"{result['peak_memory_gib']:.2f} GiB | |"
            )
    throughput = report.get("throughput", {})
    for name, result in throughput.items():
        mfu = f", MFU {result['mfu']:.1%}" if result.get("mfu") else ""
        goal = f"≥ {GOALS['mfu']:.0%} MFU" if name == "megasft" else ""
        lines.append(
            f"| {name} ({result['attention']} attention): tokens/s | "
            f"{result['tokens_per_second']:,.0f} ({result['tflops_per_device']:.3g} TFLOP/s"
            f"{mfu}) | {goal} |"
        )
    if "megasft" in throughput and "transformers" in throughput:
        ratio = (
            throughput["megasft"]["tokens_per_second"]
            / throughput["transformers"]["tokens_per_second"]
        )
        lines.append(
            f"| megasft / transformers tokens/s | {ratio:.2f}× | ≥ {GOALS['speedup']:g}× |"
        )
    for what in report.get("errors", {}):
        lines.append(f"| {what} | FAILED (traceback in gpu-check.json) | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
