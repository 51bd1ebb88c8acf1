"""Benchmark of `megasft convert` on a random Llama of about 1 GB (bf16).

    python bench/convert.py [--layers 1] [--repeats 2] [--work DIR]

The model has Llama-2-7B's real width (hidden 4096, MLP 11008, 32 heads, vocabulary 32000)
and fewer layers (1 by default: 0.93 GB of bf16 weights, saved as HF shards of 400 MB). Each
path runs in its own fresh Python process, from the interpreter start to its exit, and is
measured by wall time and the peak resident memory the kernel reports for that process:

1. `cp` of the HF directory's files (the ceiling: reading and writing the bytes once);
2. `megasft convert --from hf --to megatron` (the CLI, as users run it);
3. `megasft convert --from megatron --to hf`;
4. the naive path: `AutoModelForCausalLM.from_pretrained`, `state_dict()`, `safetensors` save.

The files are read once before timing, so every path reads from the page cache; before each
path, what the previous one wrote is written back to disk (`sync`, untimed), so that no path
waits for another's write-back. The best of `--repeats` runs is kept (the machine is shared).
Goals: each convert direction at most half the naive path's peak memory and at least twice
its speed. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# No torch or transformers here: each measured process is started from this one, and Linux
# counts the RSS of the process image it was forked from into its peak (ru_maxrss), so this
# process stays small. The model is built in a subprocess too (--build).

NAIVE = """
import os, sys, time
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
state_dict = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
os.makedirs(sys.argv[2])
save_file(state_dict, os.path.join(sys.argv[2], "model.safetensors"))
print(f"converted in {time.perf_counter() - started:.2f}s")
"""
"""The naive path; like `megasft convert`, it reports its time after the imports."""


@dataclass(frozen=True)
class Measurement:
    path: str
    seconds: float
    """Wall time of the whole process, interpreter start and imports included."""
    working_seconds: float
    """The conversion alone, as the process reports it (after its imports)."""
    peak_rss_bytes: int


def build_model(directory: Path, layers: int) -> int:
    """Save a random bf16 Llama with real width and `layers` layers; returns its weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="400MB")
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def measure(path: str, command: list[str], output: Path) -> Measurement:
    """Run `command` in a fresh process; its wall time and its own peak RSS (wait4)."""
    if output.exists():
        shutil.rmtree(output)
    # Every path writes the whole model; without this, each would also wait for the kernel to
    # write back what the previous path wrote (the dirty-page limit is a few GB here).
    os.sync()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output_text = process.stdout.read().decode()  # to the end, so the child never blocks on it
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{path} failed ({process.returncode}):\n{output_text[-3000:]}")
    reported = re.search(r"converted .*in (\d+\.\d+)s", output_text)
    working_seconds = float(reported.group(1)) if reported else seconds
    return Measurement(path, seconds, working_seconds, usage.ru_maxrss * 1024)  # KiB on Linux


def best(measurements: list[Measurement]) -> Measurement:
    return Measurement(
        measurements[0].path,
        min(m.seconds for m in measurements),
        min(m.working_seconds for m in measurements),
        min(m.peak_rss_bytes for m in measurements),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    parser.add_argument(
        "--build", type=Path, help=argparse.SUPPRESS
    )  # internal: build the model there
    args = parser.parse_args()
    if args.build:
        print(build_model(args.build, args.layers))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    built = subprocess.run(
        [sys.executable, __file__, "--build", str(hf), "--layers", str(args.layers)],
        check=True,
        capture_output=True,
        text=True,
    )
    weight_bytes = int(built.stdout.split()[-1])
    # Into the page cache, so that no path pays for the first read (in a subprocess: reading
    # here would raise this process's peak RSS, which the measured processes inherit).
    subprocess.run(["cat", *map(str, sorted(hf.iterdir()))], check=True, stdout=subprocess.DEVNULL)
    megatron = work / "megatron"
    python = sys.executable
    paths = {
        # --reflink=never: copy the bytes, as the converters must (no copy-on-write sharing).
        "copy (cp -r, the ceiling)": (
            ["cp", "-r", "--reflink=never", str(hf), str(work / "copy")],
            work / "copy",
        ),
        "megasft convert hf -> megatron": (
            [
                python,
                "-m",
                "megasft",
                "convert",
                "--from",
                "hf",
                "--to",
                "megatron",
                "--src",
                str(hf),
                "--dst",
                str(megatron),
            ],
            megatron,
        ),
        "megasft convert megatron -> hf": (
            [
                python,
                "-m",
                "megasft",
                "convert",
                "--from",
                "megatron",
                "--to",
                "hf",
                "--src",
                str(megatron),
                "--dst",
                str(work / "hf-out"),
            ],
            work / "hf-out",
        ),
        "naive (from_pretrained, state_dict, save)": (
            [python, "-c", NAIVE, str(hf), str(work / "naive")],
            work / "naive",
        ),
    }
    results = {}
    for _ in range(args.repeats):
        for path, (command, output) in paths.items():
            results.setdefault(path, []).append(measure(path, command, output))
    results = {path: best(runs) for path, runs in results.items()}

    naive = results["naive (from_pretrained, state_dict, save)"]
    print(
        f"\nconvert benchmark: Llama, hidden 4096, {args.layers} layer(s), vocab 32000, bf16 "
        f"weights {weight_bytes / 1e9:.2f} GB; {os.cpu_count()} CPUs; best of {args.repeats}\n"
    )
    print(
        f"{'path':<42} {'wall s':>7} {'speed':>6}  {'converting s':>12} {'speed':>6}  "
        f"{'peak RSS MB':>11} {'RSS':>6}"
    )
    print(
        f"{'':<42} {'':>7} {'/naive':>6}  {'(no imports)':>12} {'/naive':>6}  {'':>11} {'/naive':>6}"
    )
    for result in results.values():
        print(
            f"{result.path:<42} {result.seconds:7.1f} {naive.seconds / result.seconds:5.1f}x  "
            f"{result.working_seconds:12.1f} {naive.working_seconds / result.working_seconds:5.1f}x  "
            f"{result.peak_rss_bytes / 2**20:11.0f} {result.peak_rss_bytes / naive.peak_rss_bytes:5.2f}x"
        )
    print("\ngoals: peak RSS <= 0.5x naive and speed >= 2x naive, for each direction")
    for path in ("megasft convert hf -> megatron", "megasft convert megatron -> hf"):
        result = results[path]
        rss_ok = result.peak_rss_bytes <= 0.5 * naive.peak_rss_bytes
        wall_ok = naive.seconds / result.seconds >= 2
        working_ok = naive.working_seconds / result.working_seconds >= 2
        print(
            f"  {path}: RSS {'met' if rss_ok else 'MISSED'}; speed {'met' if wall_ok else 'MISSED'} "
            f"on wall time, {'met' if working_ok else 'MISSED'} on converting time"
        )
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
