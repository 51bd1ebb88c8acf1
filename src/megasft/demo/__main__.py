"""`make demo`: the pipeline's stages, locally, on an embedded default. No downloads.

Today: generate arithmetic word problems, train a tiny tokenizer and build a tiny random
Llama on the spot, tokenize-and-mask the problems, convert the model to a megatron-core
checkpoint, and evaluate the base model on held-out problems (from the megatron checkpoint,
converted back in-process). Training joins between conversion and evaluation as it lands.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megasft.demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="where everything is written")
    parser.add_argument("--train-problems", type=int, default=2000)
    parser.add_argument("--test-problems", type=int, default=200)
    args = parser.parse_args(argv)

    root = Path(args.output)
    if root.exists():
        shutil.rmtree(root)
    print(f"[1/5] generating arithmetic word problems into {root / 'data'}", file=sys.stderr)
    train = write_problems(root / "data" / "train.jsonl", args.train_problems, seed=1)
    test = write_problems(root / "data" / "test.jsonl", args.test_problems, seed=2)

    print(f"[2/5] training a tiny BPE tokenizer into {root / 'tokenizer'}", file=sys.stderr)
    corpus = [
        DEFAULT_CORPUS,
        *(
            json.loads(line)["question"] + " " + json.loads(line)["answer"]
            for line in train.read_text().splitlines()
        ),
    ]
    tokenizer = build_tokenizer(root / "tokenizer", corpus=corpus, vocab_size=1000)

    print("[3/5] megasft prepare: tokenize, mask and pack", file=sys.stderr)
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
        "[4/5] megasft convert: a tiny random Llama, Hugging Face -> megatron-core", file=sys.stderr
    )
    base_hf = build_tiny_llama(root / "base-hf", tokenizer)
    base_mcore = root / "base-mcore"
    convert("hf", "megatron", base_hf, base_mcore)
    print(f"  {base_hf} -> {base_mcore}", file=sys.stderr)

    print("[5/5] megasft evaluate: the base model on held-out problems", file=sys.stderr)
    evaluation = root / "eval-base"
    metrics = evaluate(
        EvaluateConfig(
            model=str(base_mcore),
            data=str(test),
            output=str(evaluation),
            task="gsm8k",
            column_map=(("prompt", "question"), ("response", "answer")),
            val_data=str(dataset),
            max_new_tokens=48,
            batch_size=32,
        )
    )
    base = metrics["summary"]
    print(
        f"  base model: accuracy {base['accuracy']:.2f}, val loss {base['val_loss']:.3f} "
        f"on {args.test_problems} held-out problems",
        file=sys.stderr,
    )
    print(f"\nmask preview: file://{(dataset / 'preview.html').resolve()}", file=sys.stderr)
    print(f"evaluation report: file://{(evaluation / 'report.html').resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
