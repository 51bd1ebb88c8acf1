"""Benchmark of `megasft prepare` on GSM8K train with the Qwen2.5 tokenizer.

    python bench/prepare.py [--repeats 5] [--shared ../shared]

Prints, side by side from one run:
1. throughput, tokens/s per core: the tokenizer alone on the already-rendered texts (the
   ceiling: `tokenizers`' encode_batch), `megasft prepare` (which encodes with tiktoken's BPE
   core where it gives the tokenizer's ids, see src/megasft/data/fast_bpe.py), the same with
   `--encoder tokenizers`, and the usual `datasets.map` + `apply_chat_template` +
   prompt-prefix masking. Each runs on one core (RAYON_NUM_THREADS=1), so the numbers are per
   core; prepare with all workers is shown too. Then the ceiling and prepare again on four
   copies of the rows, which shows how much of the gap is fixed cost.
2. packing efficiency: megasft's best-fit-decreasing over the whole dataset vs padding to the
   longest of each batch of 8 vs best-fit over 1,000-row chunks.
3. peak memory of prepare on 1x and 4x the rows, to show it streams.

Every timed run is a fresh process (`--phase NAME`), timed inside from just before the work
to just after it, so that no run inherits another's heap, imports or warm caches; the
repeats go round the phases in turn, so that a busy spell on the machine hits all of them.
Setup that is not the work (imports, reading the rows, rendering the ceiling's texts, and for
the ceiling alone loading the tokenizer) is outside the timed part.

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

REPO = Path(__file__).resolve().parents[1]
MAPPING = (("prompt", "question"), ("response", "answer"))


# --- the timed phases, each run alone in a fresh process --------------------------------------


def ceiling(train: Path, tokenizer_dir: Path, with_load: bool):
    """The rendered texts, already in memory, through the tokenizer; with `with_load`, the
    tokenizer is loaded inside the timed part too, as every real job has to."""
    from tokenizers import Tokenizer

    from megasft.data.conversation import Message
    from megasft.data.tokenizer import load_chat_tokenizer

    chat = load_chat_tokenizer(tokenizer_dir)
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
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


def megasft_prepare(
    train: Path, tokenizer_dir: Path, workers: int, scratch: Path, encoder: str = "auto"
):
    from megasft.data.prepare import PrepareConfig, prepare

    def run() -> int:
        manifest = prepare(
            PrepareConfig(
                inputs=(str(train),),
                tokenizer=str(tokenizer_dir),
                output=str(scratch / f"prepare-{workers}-{encoder}"),
                column_map=MAPPING,
                seq_length=4096,
                val_fraction=0.0,
                workers=workers,
                encoder=encoder,
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


PHASES = {
    # name: (label, cores used (None: all), how to set the run up)
    "encode": (
        "1. encode_batch alone (ceiling)",
        1,
        lambda a: ceiling(a.train, a.tokenizer_dir, with_load=False),
    ),
    "load-encode": (
        "1b. load tokenizer + encode_batch",
        1,
        lambda a: ceiling(a.train, a.tokenizer_dir, with_load=True),
    ),
    "prepare": (
        "2. megasft prepare --workers 1",
        1,
        lambda a: megasft_prepare(a.train, a.tokenizer_dir, 1, a.scratch),
    ),
    "prepare-tokenizers": (
        "   megasft prepare --encoder tokenizers",
        1,
        lambda a: megasft_prepare(a.train, a.tokenizer_dir, 1, a.scratch, "tokenizers"),
    ),
    "prepare-all": (
        "   megasft prepare --workers {cores}",
        None,
        lambda a: megasft_prepare(a.train, a.tokenizer_dir, os.cpu_count() or 1, a.scratch),
    ),
    "datasets": (
        "3. datasets.map + apply_chat_template",
        1,
        lambda a: datasets_reference(a.train, a.tokenizer_dir, a.scratch),
    ),
    # The same two on four copies of the rows, where fixed costs weigh a quarter as much.
    "encode-x4": (
        "1. encode_batch alone (ceiling)",
        1,
        lambda a: ceiling(a.scratch / "train-x4.jsonl", a.tokenizer_dir, with_load=False),
    ),
    "prepare-x4": (
        "2. megasft prepare --workers 1",
        1,
        lambda a: megasft_prepare(a.scratch / "train-x4.jsonl", a.tokenizer_dir, 1, a.scratch),
    ),
}
SCALED = ("encode-x4", "prepare-x4")


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (prepare's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_phase(args: argparse.Namespace) -> int:
    """Sets one phase up, times one run of it, and prints the result as JSON."""
    run = PHASES[args.phase][2](args)
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    print(json.dumps({"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu}))
    return 0


def timed_in_fresh_process(phase: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--shared",
        str(args.shared),
        "--scratch",
        str(args.scratch),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report --------------------------------------------------------------------------------


def peak_rss_of_prepare(
    train: Path, tokenizer_dir: Path, copies: int, scratch: Path
) -> tuple[float, int]:
    """Peak RSS (MiB) of a separate `megasft prepare` process over `copies` x the rows."""
    source = scratch / f"train-x{copies}.jsonl"
    text = train.read_text(encoding="utf-8")
    source.write_text(text * copies, encoding="utf-8")
    process = subprocess.Popen(
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # This child's own peak (wait4), not the largest of every child this bench has run.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    rows = len(text.splitlines()) * copies
    return usage.ru_maxrss / 1024, rows


def throughput(args: argparse.Namespace, cores: int) -> dict[str, float]:
    """Prints the throughput table; returns tokens/s per core by phase."""
    phases = [
        name
        for name in PHASES
        if name not in SCALED and not (name == "datasets" and args.skip_reference)
    ]
    if cores == 1:
        phases.remove("prepare-all")
    runs: dict[str, list[dict]] = {phase: [] for phase in phases}
    for _ in range(args.repeats):
        for phase in phases:
            runs[phase].append(timed_in_fresh_process(phase, args))
    best = {phase: min(results, key=lambda r: r["seconds"]) for phase, results in runs.items()}

    print(
        f"\nGSM8K train, Qwen2.5 tokenizer, {cores} cores, best of {args.repeats} fresh processes\n"
    )
    print(
        f"{'path':46s} {'cores':>5s} {'tokens/s':>10s} {'tokens/s/core':>14s} {'seconds':>8s} "
        f"{'cpu s':>6s}"
    )
    per_core = {}
    for phase in phases:
        label, used, _ = PHASES[phase]
        used = used or cores
        result = best[phase]
        rate = result["tokens"] / result["seconds"]
        per_core[phase] = rate / used
        print(
            f"{label.format(cores=cores):46s} {used:5d} {rate:10.0f} {rate / used:14.0f} "
            f"{result['seconds']:8.2f} {result['cpu_seconds']:6.2f}"
        )
    print(
        "\nratios of tokens/s per core: of the best runs, and the median [lowest, highest] of the"
        "\nratios within each round (the runs of a round are seconds apart, so they share the"
        "\nmachine's mood; this machine's speed drifts by a third from minute to minute)"
    )
    for name, mine, reference, goal in (
        ("prepare / ceiling (encode alone)", "prepare", "encode", ">= 0.80"),
        ("prepare / ceiling (load + encode)", "prepare", "load-encode", ">= 0.80"),
        ("prepare / datasets.map", "prepare", "datasets", ">= 2"),
        ("  --encoder tokenizers / ceiling", "prepare-tokenizers", "encode", ""),
    ):
        if reference not in runs or mine not in runs:
            continue
        rounds = sorted(
            _rate(own) / _rate(theirs)
            for own, theirs in zip(runs[mine], runs[reference], strict=True)
        )
        print(
            f"{name:36s} best {per_core[mine] / per_core[reference]:5.2f}   "
            f"rounds {np.median(rounds):5.2f} [{rounds[0]:.2f}, {rounds[-1]:.2f}]   "
            + (f"goal {goal}" if goal else "(tiktoken's BPE core off, for comparison)")
        )
    return per_core


def scaled(args: argparse.Namespace) -> None:
    """Prints ceiling and prepare on four copies of GSM8K train: how much of the gap on one
    copy is fixed cost (loading the tokenizer, hashing the inputs, writing the outputs)."""
    copies = 4
    text = args.train.read_text(encoding="utf-8")
    (args.scratch / "train-x4.jsonl").write_text(text * copies, encoding="utf-8")
    rounds = max(1, args.repeats // 2)
    runs: dict[str, list[dict]] = {phase: [] for phase in SCALED}
    for _ in range(rounds):
        for phase in SCALED:
            runs[phase].append(timed_in_fresh_process(phase, args))
    print(f"\nthe same on GSM8K train x{copies}, best of {rounds} fresh processes\n")
    print(f"{'path':46s} {'tokens/s/core':>14s} {'seconds':>8s}")
    for phase in SCALED:
        best = min(runs[phase], key=lambda r: r["seconds"])
        print(f"{PHASES[phase][0]:46s} {_rate(best):14.0f} {best['seconds']:8.2f}")
    ratios = sorted(
        _rate(mine) / _rate(theirs)
        for mine, theirs in zip(runs["prepare-x4"], runs["encode-x4"], strict=True)
    )
    print(
        f"{'prepare / ceiling (encode alone)':36s} rounds {np.median(ratios):5.2f} "
        f"[{ratios[0]:.2f}, {ratios[-1]:.2f}]"
    )


def _rate(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def packing(train: Path, tokenizer_dir: Path, scratch: Path, cores: int) -> None:
    from megasft.data import read_examples
    from megasft.data.packing import (
        pack_best_fit_decreasing,
        pack_best_fit_in_chunks,
        packing_efficiency,
    )
    from megasft.data.prepare import PrepareConfig, prepare

    # On the lengths megasft produced (unpacked examples).
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
        f"{'megasft: best-fit-decreasing, whole dataset':46s} {len(bfd):6d} "
        f"{packing_efficiency(lengths, bfd, capacity):10.2%}"
    )
    print(
        f"{'best-fit-decreasing in 1,000-row chunks':46s} {len(chunks):6d} "
        f"{packing_efficiency(lengths, chunks, capacity):10.2%}"
    )
    print(
        f"{'no packing: pad to the longest of 8':46s} {len(lengths) // 8:6d} "
        f"{lengths.sum() / padded:10.2%}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="skip the datasets.map run")
    parser.add_argument(
        "--only-throughput", action="store_true", help="skip the packing and memory sections"
    )
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()

    args.shared = Path(args.shared)
    args.train = args.shared / "data" / "gsm8k" / "train.jsonl"
    args.tokenizer_dir = args.shared / "data" / "tokenizers" / "qwen2.5"
    if not args.train.is_file() or not args.tokenizer_dir.is_dir():
        print(f"needs {args.train} and {args.tokenizer_dir}; pass --shared DIR", file=sys.stderr)
        return 2
    if args.phase:
        args.scratch = Path(args.scratch)
        return run_phase(args)
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="megasft-bench-") as tmp:
        args.scratch = Path(tmp)
        throughput(args, cores)
        if args.only_throughput:
            return 0
        scaled(args)
        packing(args.train, args.tokenizer_dir, args.scratch, cores)
        print("\npeak memory of one `megasft prepare --workers 1` process\n")
        print(f"{'input':20s} {'rows':>8s} {'peak RSS MiB':>13s}")
        for copies in (1, 4):
            rss, count = peak_rss_of_prepare(args.train, args.tokenizer_dir, copies, args.scratch)
            print(f"{f'GSM8K train x{copies}':20s} {count:8d} {rss:13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
