"""`make demo`: the pipeline's stages, locally, on an embedded default. No downloads.

Today: generate arithmetic word problems, train a tiny tokenizer and build a tiny random
Llama on the spot, tokenize-and-mask the problems, convert the model to a megatron-core
checkpoint, fine-tune it with megatron-core on 2 CPU processes (the emulation layer, gloo),
export the result to Hugging Face, and evaluate tuned against base on held-out problems.
The Kubeflow pipeline that wires these steps comes with the pipeline issue.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from megasft.checkpoint.convert import convert
from megasft.data.cli import summarize
from megasft.data.prepare import PrepareConfig, prepare
from megasft.demo.model import build_tiny_llama
from megasft.demo.problems import write_problems
from megasft.demo.tokenizer import DEFAULT_CORPUS, build_tokenizer
from megasft.evaluate import EvaluateConfig, evaluate
from megasft.train.config import TrainConfig
from megasft.train.stage import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megasft.demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="where everything is written")
    parser.add_argument("--train-problems", type=int, default=2000)
    parser.add_argument("--test-problems", type=int, default=200)
    parser.add_argument("--train-iters", type=int, default=200)
    args = parser.parse_args(argv)

    root = Path(args.output)
    if root.exists():
        shutil.rmtree(root)
    print(f"[1/7] generating arithmetic word problems into {root / 'data'}", file=sys.stderr)
    train = write_problems(root / "data" / "train.jsonl", args.train_problems, seed=1)
    test = write_problems(root / "data" / "test.jsonl", args.test_problems, seed=2)

    print(f"[2/7] training a tiny BPE tokenizer into {root / 'tokenizer'}", file=sys.stderr)
    problems = [json.loads(line) for line in train.read_text().splitlines()]
    corpus = [DEFAULT_CORPUS, *(f"{p['question']} {p['answer']}" for p in problems)]
    tokenizer = build_tokenizer(root / "tokenizer", corpus=corpus, vocab_size=1000)

    print("[3/7] megasft prepare: tokenize, mask and pack", file=sys.stderr)
    dataset = root / "dataset"
    manifest = prepare(
        PrepareConfig(
            inputs=(str(train),),
            tokenizer=str(tokenizer),
            output=str(dataset),
            column_map=(("prompt", "question"), ("response", "answer")),
            seq_length=512,
            val_fraction=0.05,
        )
    )
    print(summarize(manifest, dataset), file=sys.stderr)

    print(
        "[4/7] megasft convert: a tiny random Llama, Hugging Face -> megatron-core", file=sys.stderr
    )
    base_hf = build_tiny_llama(root / "base-hf", tokenizer)
    base_mcore = root / "base-mcore"
    convert("hf", "megatron", base_hf, base_mcore)
    print(f"  {base_hf} -> {base_mcore}", file=sys.stderr)

    print("[5/7] megasft train: SFT on megatron-core, 2 CPU processes", file=sys.stderr)
    summary = run_training(
        TrainConfig(
            data=str(dataset),
            load=str(base_mcore),
            save=str(root / "train"),
            nproc=2,
            micro_batch_size=4,
            global_batch_size=16,
            train_iters=args.train_iters,
            lr=2e-3,
            min_lr=2e-4,
            warmup_iters=min(10, args.train_iters // 2),
            precision="fp32",
            eval_interval=max(1, args.train_iters // 4),
        )
    )
    checkpoint = summary["checkpoint"]
    print(f"  final checkpoint: {checkpoint}", file=sys.stderr)

    print(
        "[6/7] megasft convert: the tuned checkpoint, megatron-core -> Hugging Face",
        file=sys.stderr,
    )
    tuned_hf = root / "tuned-hf"
    convert("megatron", "hf", checkpoint, tuned_hf)

    print("[7/7] megasft evaluate: tuned vs base on held-out problems", file=sys.stderr)
    evaluation = root / "eval"
    metrics = evaluate(
        EvaluateConfig(
            model=str(tuned_hf),
            baseline=str(base_hf),
            data=str(test),
            output=str(evaluation),
            task="gsm8k",
            column_map=(("prompt", "question"), ("response", "answer")),
            val_data=str(dataset),
            training_log=str(root / "train" / "metrics.jsonl"),
            max_new_tokens=48,
            batch_size=32,
        )
    )
    result = metrics["summary"]
    print(
        f"  on {args.test_problems} held-out problems: base accuracy "
        f"{result['base_accuracy']:.2f}, tuned accuracy {result['accuracy']:.2f}; "
        f"val loss {result['base_val_loss']:.3f} -> {result['val_loss']:.3f}",
        file=sys.stderr,
    )
    print(f"\nmask preview: file://{(dataset / 'preview.html').resolve()}", file=sys.stderr)
    print(f"evaluation report: file://{(evaluation / 'report.html').resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
