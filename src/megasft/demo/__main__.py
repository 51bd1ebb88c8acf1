"""`make demo`: the pipeline's stages, locally, on an embedded default. No downloads.

Today it runs tokenize-and-mask on a generated arithmetic word-problem set with a tokenizer
trained on the spot; later stages join as they land.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from megasft.data.cli import summarize
from megasft.data.prepare import PrepareConfig, prepare
from megasft.demo.problems import write_problems
from megasft.demo.tokenizer import DEFAULT_CORPUS, build_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megasft.demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="where everything is written")
    parser.add_argument("--train-problems", type=int, default=2000)
    parser.add_argument("--test-problems", type=int, default=200)
    args = parser.parse_args(argv)

    root = Path(args.output)
    if root.exists():
        shutil.rmtree(root)
    print(f"[1/3] generating arithmetic word problems into {root / 'data'}", file=sys.stderr)
    train = write_problems(root / "data" / "train.jsonl", args.train_problems, seed=1)
    test = write_problems(root / "data" / "test.jsonl", args.test_problems, seed=2)

    print(f"[2/3] training a tiny BPE tokenizer into {root / 'tokenizer'}", file=sys.stderr)
    corpus = [
        DEFAULT_CORPUS,
        *(
            json.loads(line)["question"] + " " + json.loads(line)["answer"]
            for line in train.read_text().splitlines()
        ),
    ]
    tokenizer = build_tokenizer(root / "tokenizer", corpus=corpus, vocab_size=1000)

    print("[3/3] megasft prepare: tokenize, mask and pack", file=sys.stderr)
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
    print(f"held-out problems for evaluation: {test}", file=sys.stderr)
    print(
        f"open the mask preview in a browser: file://{(dataset / 'preview.html').resolve()}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
