"""Benchmark of `megasft train`: against a plain PyTorch loop, and packed vs unpacked rows.

    python bench/train.py [--examples 384] [--steps 10] [--seq-length 512] [--threads N]
                          [--json FILE]

Data: GSM8K train questions and answers from ../shared when present (generated word problems
otherwise), in ChatML, tokenized by a byte-level BPE of 8,192 tokens trained on that text
here, so rows have GSM8K's lengths. Model: a random Llama (hidden 256, 4 layers, 8 heads in 4
key/value groups, SwiGLU 688) sized to that tokenizer, converted to megatron-core.

Printed side by side from one run, all on the CPU in fp32 with the same threads, micro-batch
(4 rows), global batch (16 rows) and sequence length:

- `megasft train` (megatron-core through the CPU emulation layer, one process) on packed rows
  and on one example per row;
- `megasft train --peft lora` (rank 16 on every linear) on packed rows: beside full SFT,
  trainable parameters and optimizer-state bytes (from what each final checkpoint holds),
  peak resident memory of the process, and step time;
- a plain PyTorch loop over the equivalent `transformers` model (LlamaForCausalLM, SDPA
  attention, AdamW, gradient accumulation and clipping) on one example per row, padded,
  with the same -100-style target selection;

as tokens/s (real tokens, padding excluded) and trained tokens/s (target tokens), from the
median step time over the steps after the first two (the fastest step is shown too: on a
shared machine the median moves with the other load). Goals: megasft on the same rows at
least 0.8x the plain loop's tokens/s, on packed rows at least 2x. `--json FILE` writes the
figures (`plain_tokens_per_s`, `megasft_unpacked_tokens_per_s`, `megasft_packed_tokens_per_s`,
the ratios, the conditions).

With a CUDA/ROCm device (and Transformer Engine), it also trains a Llama-3.2-1B-shaped
model (hidden 2048, 16 layers, 32 heads, 8 key/value groups, SwiGLU 8192) in bf16 on packed
4,096-token rows through Transformer Engine (THD with cu_seqlens) and reports TFLOP/s per
device and MFU against the device's dense bf16 peak.

Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MICRO_BATCH = 4
GLOBAL_BATCH = 16
SKIPPED_STEPS = 2  # warm-up steps left out of the medians


def write_examples(path: Path, count: int) -> str:
    if GSM8K_TRAIN.is_file():
        lines = GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()[:count]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return f"GSM8K train ({GSM8K_TRAIN}), first {len(lines)}"
    from megasft.demo.problems import write_problems

    write_problems(path, count, seed=0)
    return f"{count} generated word problems"


def prepare_data(work: Path, examples: Path, seq_length: int, vocab_size: int):
    from megasft.data.prepare import PrepareConfig, prepare
    from megasft.demo.tokenizer import build_tokenizer

    corpus = [
        json.loads(line)["question"] + "\n" + json.loads(line)["answer"]
        for line in examples.read_text(encoding="utf-8").splitlines()
    ]
    tokenizer = build_tokenizer(
        work / "tokenizer", chat_template=CHATML, corpus=corpus, vocab_size=vocab_size
    )
    manifests = {}
    for name, pack in (("packed", True), ("unpacked", False)):
        manifests[name] = prepare(
            PrepareConfig(
                inputs=(str(examples),),
                tokenizer=str(tokenizer),
                output=str(work / name),
                column_map=(("prompt", "question"), ("response", "answer")),
                seq_length=seq_length,
                pack=pack,
                val_fraction=0.0,
                workers=1,
                progress=False,
            )
        )
    return tokenizer, manifests


def build_model(work: Path, tokenizer: Path, seq_length: int) -> tuple[Path, Path]:
    """The random Llama as a Hugging Face directory, and converted to megatron-core."""
    import shutil

    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from megasft.checkpoint.convert import convert

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(),
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=max(seq_length, 1024),
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    hf = work / "hf"
    LlamaForCausalLM(config).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, hf / name)
    convert("hf", "megatron", hf, work / "mcore")
    return hf, work / "mcore"


# `megasft train` in this process's child, printing its peak resident memory (one process:
# nproc 1 trains in-process) when it ends.
MEASURED_TRAIN = (
    "import resource, sys; from megasft.cli import main; code = main(sys.argv[1:]); "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
)


def checkpoint_sizes(checkpoint: Path) -> dict:
    """Parameters and optimizer-state bytes, from what the final checkpoint holds: a LoRA
    checkpoint holds the trainable tensors only, a full one every tensor."""
    from megasft.checkpoint.dist_checkpoint_io import DistCheckpointReader
    from megasft.checkpoint.tensor_bytes import byte_count

    reader = DistCheckpointReader(checkpoint)
    model = [t for key, t in reader.tensors.items() if not key.startswith("optimizer.")]
    state = [t for key, t in reader.tensors.items() if key.startswith("optimizer.")]
    count = 0
    for tensor in model:
        size = 1
        for dim in tensor.shape:
            size *= dim
        count += size
    return {
        "trainable": count,
        "optimizer_bytes": sum(byte_count(t.shape, t.dtype) for t in state),
    }


def megasft_run(
    work: Path, data: Path, mcore: Path, steps: int, threads: int, *extra: str, name: str = ""
) -> dict:
    save = work / f"run-{data.name}{name}"
    command = [
        sys.executable, "-c", MEASURED_TRAIN, "train", "--data", str(data), "--load", str(mcore),
        "--save", str(save), "--train-iters", str(steps), "--micro-batch-size",
        str(MICRO_BATCH), "--global-batch-size", str(GLOBAL_BATCH), "--lr", "1e-4",
        "--warmup-iters", "1", "--precision", "fp32", "--save-interval", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    peak_kib = next(
        int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak_rss")
    )
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()][
        SKIPPED_STEPS:
    ]
    return {
        "seconds": statistics.median(r["step_seconds"] for r in records),
        "best": min(r["step_seconds"] for r in records),
        "tokens": statistics.median(r["tokens"] for r in records),
        "targets": statistics.median(r["target_tokens"] for r in records),
        "peak_mib": peak_kib / 1024,
        **checkpoint_sizes(save / f"iter_{steps:07d}"),
    }


def plain_pytorch_run(hf: Path, data: Path, steps: int, threads: int, seq_length: int) -> dict:
    """The loop people write with transformers: padded rows, attention_mask, labels -100."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from megasft.data.store import open_split
    from megasft.train.data import StepSampler

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.float32, attn_implementation="sdpa"
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    table = open_split(data)
    sampler = StepSampler(table.num_rows, GLOBAL_BATCH, MICRO_BATCH, 1, 0, seed=1234)
    timings = []
    for step in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        tokens = targets = 0
        batches = []
        for indices in sampler.micro_batches(step):
            rows = table.take(indices.astype(np.int64)).to_pylist()
            ids = torch.zeros(len(rows), seq_length, dtype=torch.long)
            attention = torch.zeros(len(rows), seq_length, dtype=torch.long)
            labels = torch.full((len(rows), seq_length), -100, dtype=torch.long)
            for row, example in enumerate(rows):
                n = len(example["input_ids"])
                ids[row, :n] = torch.tensor(example["input_ids"])
                attention[row, :n] = 1
                mask = torch.tensor(example["loss_mask"]).bool()
                labels[row, :n] = torch.where(mask, ids[row, :n], -100)
                tokens += n
                targets += int(mask[1:].sum())
            batches.append((ids, attention, labels))
        for ids, attention, labels in batches:
            logits = model(input_ids=ids, attention_mask=attention).logits
            # sum over targets / targets of the global batch, as megasft does
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum",
            ) / max(targets, 1)  # fmt: skip
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        timings.append((time.perf_counter() - started, tokens, targets))
    kept = timings[SKIPPED_STEPS:]
    return {
        "seconds": statistics.median(t[0] for t in kept),
        "best": min(t[0] for t in kept),
        "tokens": statistics.median(t[1] for t in kept),
        "targets": statistics.median(t[2] for t in kept),
    }


def gpu_run(work: Path, examples: Path, steps: int) -> dict | None:
    """A Llama-3.2-1B-shaped model, bf16, packed 4096-token rows, Transformer Engine."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return {"error": "no Transformer Engine installed (pip install -e '.[gpu]')"}
    from transformers import LlamaConfig, LlamaForCausalLM

    from megasft.checkpoint.convert import convert

    gpu_work = work / "gpu"
    tokenizer, _ = prepare_data(gpu_work, examples, 4096, vocab_size=32000)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(gpu_work / "hf")
    del model
    convert("hf", "megatron", gpu_work / "hf", gpu_work / "mcore")
    save = gpu_work / "run"
    nproc = torch.cuda.device_count()
    command = [
        sys.executable, "-m", "megasft", "train", "--data", str(gpu_work / "packed"),
        "--load", str(gpu_work / "mcore"), "--save", str(save), "--nproc", str(nproc),
        "--train-iters", str(steps), "--micro-batch-size", "1", "--global-batch-size",
        str(8 * nproc), "--precision", "bf16", "--lr", "1e-5", "--warmup-iters", "1",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()][
        SKIPPED_STEPS:
    ]
    return {
        "device": torch.cuda.get_device_name(),
        "devices": nproc,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in records),
        "tflops_per_device": statistics.median(r["tflops_per_device"] for r in records),
        "mfu": statistics.median(r["mfu"] for r in records) if records[0]["mfu"] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="megasft-bench-train-") as scratch:
        work = Path(scratch)
        source = write_examples(work / "examples.jsonl", args.examples)
        tokenizer, manifests = prepare_data(work, work / "examples.jsonl", args.seq_length, 8192)
        hf, mcore = build_model(work, tokenizer, args.seq_length)
        results = {
            "megasft train, packed rows": megasft_run(
                work, work / "packed", mcore, args.steps, args.threads
            ),
            "megasft train, one example per row": megasft_run(
                work, work / "unpacked", mcore, args.steps, args.threads
            ),
            "megasft train --peft lora (r 16), packed": megasft_run(
                work,
                work / "packed",
                mcore,
                args.steps,
                args.threads,
                "--peft",
                "lora",
                "--lora-rank",
                "16",
                name="-lora",
            ),  # fmt: skip
            "plain PyTorch + transformers, one per row": plain_pytorch_run(
                hf, work / "unpacked", args.steps, args.threads, args.seq_length
            ),
        }
        gpu = gpu_run(work, work / "examples.jsonl", args.gpu_steps)

    print(
        f"megasft train benchmark on {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, fp32; data: {source}; seq_length {args.seq_length}; "
        f"packing efficiency {manifests['packed']['packing_efficiency']:.2f} packed vs "
        f"{manifests['unpacked']['packing_efficiency']:.2f} one per row; "
        f"{GLOBAL_BATCH} rows per step in micro-batches of {MICRO_BATCH}; median of steps "
        f"{SKIPPED_STEPS + 1}-{args.steps}"
    )
    header = (
        f"{'run':<44} {'s/step':>8} {'best':>8} {'tokens/step':>12} {'tokens/s':>10} "
        f"{'targets/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        print(
            f"{name:<44} {result['seconds']:>8.3f} {result['best']:>8.3f} "
            f"{result['tokens']:>12.0f} "
            f"{result['tokens'] / result['seconds']:>10.0f} "
            f"{result['targets'] / result['seconds']:>10.0f}"
        )
    print()
    header = f"{'run':<44} {'trainable':>12} {'optimizer MB':>13} {'peak RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        if "trainable" in result:  # megasft's runs: what their final checkpoints hold
            print(
                f"{name:<44} {result['trainable']:>12,} "
                f"{result['optimizer_bytes'] / 1e6:>13.2f} {result['peak_mib']:>13.0f}"
            )
    per_second = {name: result["tokens"] / result["seconds"] for name, result in results.items()}
    plain = per_second["plain PyTorch + transformers, one per row"]
    unpacked = per_second["megasft train, one example per row"]
    packed = per_second["megasft train, packed rows"]
    print(
        f"megasft / plain, same rows: {unpacked / plain:.2f}x (goal 0.8x); packed / plain: "
        f"{packed / plain:.2f}x (goal 2x); load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    if gpu is None:
        print("GPU: no CUDA/ROCm device here; the Transformer Engine / bf16 / MFU run was skipped")
    else:
        print(f"GPU (Llama-3.2-1B shape, bf16, packed 4096, Transformer Engine): {gpu}")
    if args.json:
        best = {name: result["tokens"] / result["best"] for name, result in results.items()}
        figures = {
            "plain_tokens_per_s": round(plain, 1),
            "megasft_unpacked_tokens_per_s": round(unpacked, 1),
            "megasft_packed_tokens_per_s": round(packed, 1),
            "unpacked_over_plain": round(unpacked / plain, 3),
            "packed_over_plain": round(packed / plain, 3),
            "best_step_tokens_per_s": {name: round(value, 1) for name, value in best.items()},
            "runs": results,
            "conditions": {
                "threads": args.threads,
                "cpu_count": os.cpu_count(),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg()[0],
                "seq_length": args.seq_length,
                "steps": args.steps,
                "data": source,
                "processor": platform.processor() or platform.machine(),
            },
            "gpu": gpu,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
