"""Benchmark of `megasft prepare` on GSM8K train with the Qwen2.5 tokenizer.

    python bench/prepare.py [--repeats 2] [--shared ../shared]

Prints, side by side from one run:
1. throughput, tokens/s per core: the tokenizer alone on the already-rendered texts (the
   ceiling), `megasft prepare`, and the usual `datasets.map` + `apply_chat_template` +
   prompt-prefix masking. Each runs on one core (one process, RAYON_NUM_THREADS=1), so the
   numbers are per core; prepare with all workers is shown too.
2. packing efficiency: megasft's best-fit-decreasing over the whole dataset vs padding to the
   longest of each batch of 8 vs best-fit over 1,000-row chunks.
3. peak memory of prepare on 1x and 4x the rows, to show it streams.

Not a test: it asserts nothing and prints the goals beside the figures.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from megasft.data import read_examples  # noqa: E402
from megasft.data.conversation import Message  # noqa: E402
from megasft.data.packing import (  # noqa: E402
    pack_best_fit_decreasing,
    pack_best_fit_in_chunks,
    packing_efficiency,
)
from megasft.data.prepare import PrepareConfig, prepare  # noqa: E402
from megasft.data.tokenizer import load_chat_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAPPING = (("prompt", "question"), ("response", "answer"))


def best_of(repeats: int, run) -> tuple[float, int]:
    """(best seconds, tokens) over `repeats` runs; the machine is shared, so take the best."""
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = run()
        best = min(best, time.perf_counter() - started)
    return best, tokens


def ceiling(rows: list[dict], tokenizer_dir: Path, with_load: bool):
    """The rendered texts, already in memory, through `encode_batch`; with `with_load`, the
    tokenizer is loaded inside the timed part too, as every real job has to."""
    chat = load_chat_tokenizer(tokenizer_dir)
    texts = [
        chat.template.render([Message("user", r["question"]), Message("assistant", r["answer"])])
        for r in rows
    ]

    def run() -> int:
        tokenizer = (
            Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
            if with_load
            else chat.tokenizer
        )
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        return sum(len(e.ids) for e in encodings)

    return run


def megasft_prepare(train: Path, tokenizer_dir: Path, workers: int, scratch: Path):
    def run() -> int:
        manifest = prepare(
            PrepareConfig(
                inputs=(str(train),),
                tokenizer=str(tokenizer_dir),
                output=str(scratch / f"prepare-{workers}"),
                column_map=MAPPING,
                seq_length=4096,
                val_fraction=0.0,
                workers=workers,
                overwrite=True,
                progress=False,
            )
        )
        return manifest["tokens"]

    return run


def datasets_reference(train: Path, tokenizer_dir: Path, scratch: Path):
    """The way most SFT scripts do it today: load the tokenizer and the data, one `map` over
    rows, the chat template applied by transformers, the prompt rendered and tokenized again
    to mask its length. Timed as a whole job, like prepare."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()

    def tokenize(row: dict, tokenizer) -> dict:
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
        full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
        prompt = tokenizer(
            tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        )["input_ids"]
        labels = [-100] * len(prompt) + full[len(prompt) :]
        return {"input_ids": full, "labels": labels}

    def run() -> int:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        dataset = datasets.load_dataset(
            "json", data_files=str(train), split="train", cache_dir=str(scratch / "hf-cache")
        )
        mapped = dataset.map(
            tokenize,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=dataset.column_names,
            load_from_cache_file=False,
        )
        return sum(len(ids) for ids in mapped["input_ids"])

    return run


def peak_rss_of_prepare(
    train: Path, tokenizer_dir: Path, copies: int, scratch: Path
) -> tuple[float, int]:
    """Peak RSS (MiB) of a separate `megasft prepare` process over `copies` x the rows."""
    source = scratch / f"train-x{copies}.jsonl"
    text = train.read_text(encoding="utf-8")
    source.write_text(text * copies, encoding="utf-8")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megasft",
            "prepare",
            "--input",
            str(source),
            "--tokenizer",
            str(tokenizer_dir),
            "--output",
            str(scratch / f"rss-{copies}"),
            "--map",
            "prompt=question,response=answer",
            "--val-fraction",
            "0",
            "--workers",
            "1",
            "--quiet",
            "--overwrite",
        ],
        check=True,
        capture_output=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rows = len(text.splitlines()) * copies
    # ru_maxrss of children is the max over all waited-for children; runs go smallest first.
    return max(after, before) / 1024, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true", help="skip the datasets.map run")
    args = parser.parse_args()

    shared = Path(args.shared)
    train = shared / "data" / "gsm8k" / "train.jsonl"
    tokenizer_dir = shared / "data" / "tokenizers" / "qwen2.5"
    if not train.is_file() or not tokenizer_dir.is_dir():
        print(f"needs {train} and {tokenizer_dir}; pass --shared DIR", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="megasft-bench-") as tmp:
        scratch = Path(tmp)
        results = []
        seconds, tokens = best_of(args.repeats, ceiling(rows, tokenizer_dir, with_load=False))
        results.append(("1. encode_batch alone (ceiling)", 1, tokens / seconds, seconds))
        seconds, tokens = best_of(args.repeats, ceiling(rows, tokenizer_dir, with_load=True))
        results.append(("1b. load tokenizer + encode_batch", 1, tokens / seconds, seconds))
        seconds, tokens = best_of(args.repeats, megasft_prepare(train, tokenizer_dir, 1, scratch))
        results.append(("2. megasft prepare --workers 1", 1, tokens / seconds, seconds))
        if cores > 1:
            seconds, tokens = best_of(
                args.repeats, megasft_prepare(train, tokenizer_dir, cores, scratch)
            )
            results.append(
                (f"   megasft prepare --workers {cores}", cores, tokens / seconds, seconds)
            )
        if not args.skip_reference:
            seconds, tokens = best_of(
                args.repeats, datasets_reference(train, tokenizer_dir, scratch)
            )
            results.append(("3. datasets.map + apply_chat_template", 1, tokens / seconds, seconds))

        print(
            f"\nGSM8K train: {len(rows)} rows, Qwen2.5 tokenizer, {cores} cores, best of {args.repeats}\n"
        )
        print(
            f"{'path':46s} {'cores':>5s} {'tokens/s':>10s} {'tokens/s/core':>14s} {'seconds':>8s}"
        )
        per_core = {}
        for name, used, rate, seconds in results:
            per_core[name.split(" ")[0]] = rate / used
            print(f"{name:46s} {used:5d} {rate:10.0f} {rate / used:14.0f} {seconds:8.2f}")
        print(
            f"\nprepare / ceiling, per core: {per_core['2.'] / per_core['1.']:.2f} against "
            f"encode alone, {per_core['2.'] / per_core['1b.']:.2f} against load + encode "
            "(goal >= 0.80)"
        )
        if "3." in per_core:
            print(
                f"prepare / datasets.map, per core: {per_core['2.'] / per_core['3.']:.2f}   (goal >= 2)"
            )

        # Packing, on the lengths megasft produced (unpacked examples).
        lengths_run = prepare(
            PrepareConfig(
                inputs=(str(train),),
                tokenizer=str(tokenizer_dir),
                output=str(scratch / "unpacked"),
                column_map=MAPPING,
                pack=False,
                val_fraction=0.0,
                workers=cores,
                progress=False,
            )
        )
        lengths = np.array([len(r["input_ids"]) for r in read_examples(scratch / "unpacked")])
        assert len(lengths) == lengths_run["examples"]
        capacity = 4096
        padded = sum(8 * lengths[i : i + 8].max() for i in range(0, len(lengths), 8))
        print(
            f"\npacking at --seq-length {capacity} ({len(lengths)} examples, {lengths.sum()} tokens)\n"
        )
        print(f"{'method':46s} {'rows':>6s} {'efficiency':>10s}")
        bfd = pack_best_fit_decreasing(lengths, capacity)
        chunks = pack_best_fit_in_chunks(lengths, capacity, 1000)
        print(
            f"{'megasft: best-fit-decreasing, whole dataset':46s} {len(bfd):6d} {packing_efficiency(lengths, bfd, capacity):10.2%}"
        )
        print(
            f"{'best-fit-decreasing in 1,000-row chunks':46s} {len(chunks):6d} {packing_efficiency(lengths, chunks, capacity):10.2%}"
        )
        print(
            f"{'no packing: pad to the longest of 8':46s} {len(lengths) // 8:6d} {lengths.sum() / padded:10.2%}"
        )

        print("\npeak memory of one `megasft prepare --workers 1` process\n")
        print(f"{'input':20s} {'rows':>8s} {'peak RSS MiB':>13s}")
        for copies in (1, 4):
            rss, count = peak_rss_of_prepare(train, tokenizer_dir, copies, scratch)
            print(f"{f'GSM8K train x{copies}':20s} {count:8d} {rss:13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
