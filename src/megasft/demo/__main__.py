"""`make demo`: the whole Kubeflow pipeline on this machine, on an embedded default. No downloads.

It builds the inputs a real run would find on its volume: arithmetic word problems in GSM8K's
form (train and held-out test), a tiny BPE tokenizer with a ChatML template, and a tiny random
Llama-architecture Hugging Face model (`--config demo-moe`, `make demo-moe`: a tiny Qwen3-MoE,
trained with expert parallelism). Then it runs the pipeline (pipelines/configs/demo.yaml or
demo-moe.yaml) with kfp.local: validate, tokenize-and-mask and hf -> megatron conversion, training with
megatron-core on 2 CPU processes (torchrun, the emulation layer, gloo), export to Hugging Face,
evaluation of tuned vs base, and registration in MLflow when the gate passes. Everything is
tracked in an embedded MLflow store (sqlite) in the output directory. It prints a line as each
step starts and ends; each step's full output is in OUTPUT/logs (--verbose streams it all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from megasft.demo.model import build_tiny_llama, build_tiny_qwen3_moe
from megasft.demo.problems import write_problems
from megasft.demo.tokenizer import DEFAULT_CORPUS, build_tokenizer
from megasft.pipeline.config import PipelineConfig, load_pipeline_config
from megasft.pipeline.local import run_local

DEMOS = {
    "demo": ("a tiny random Llama", build_tiny_llama, "demo-output"),
    "demo-lora": ("a tiny random Llama", build_tiny_llama, "demo-output"),
    "demo-moe": ("a tiny random Qwen3-MoE", build_tiny_qwen3_moe, "demo-moe-output"),
}
"""Each demo configuration (pipelines/configs/NAME.yaml): the base model it is built for, and
where it is written by default."""


def build_inputs(
    inputs: Path, train_problems: int, test_problems: int, name: str = "demo"
) -> dict[str, Path]:
    """The demo's raw inputs: problems, and a base model that carries its tokenizer."""
    print(f"[demo] generating arithmetic word problems into {inputs}", file=sys.stderr)
    train = write_problems(inputs / "train.jsonl", train_problems, seed=1)
    test = write_problems(inputs / "test.jsonl", test_problems, seed=2)
    what, build_model, _ = DEMOS[name]
    print(f"[demo] training a tiny BPE tokenizer and building {what}", file=sys.stderr)
    problems = [json.loads(line) for line in train.read_text().splitlines()]
    corpus = [DEFAULT_CORPUS, *(f"{p['question']} {p['answer']}" for p in problems)]
    tokenizer = build_tokenizer(inputs / "tokenizer", corpus=corpus, vocab_size=1000)
    model = build_model(inputs / "base-hf", tokenizer)
    return {"train": train, "test": test, "model": model}


def demo_config(
    root: Path, inputs: dict[str, Path], train_iters: int | None, name: str = "demo"
) -> PipelineConfig:
    """pipelines/configs/NAME.yaml (one of DEMOS) with its paths under `root`."""
    config = load_pipeline_config(name)
    train = dict(config.train)
    if train_iters is not None:  # a shorter run (the tests) keeps the schedule's proportions
        train["train_iters"] = train_iters
        train["warmup_iters"] = min(train["warmup_iters"], max(train_iters // 4, 0))
        train["eval_interval"] = min(train["eval_interval"], max(train_iters // 2, 1))
        train["save_interval"] = min(train["save_interval"], train_iters)
    return dataclasses.replace(
        config,
        data={**config.data, "path": str(inputs["train"])},
        model={**config.model, "path": str(inputs["model"])},
        train=train,
        evaluate={**config.evaluate, "data": str(inputs["test"])},
        tracking=dataclasses.replace(
            config.tracking, uri=f"sqlite:///{(root / 'mlflow.db').resolve()}"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megasft.demo", description=__doc__)
    parser.add_argument(
        "--output",
        default=None,
        help="where everything is written (default: demo-output; demo-moe-output for demo-moe)",
    )
    parser.add_argument("--train-problems", type=int, default=2000)
    parser.add_argument("--test-problems", type=int, default=200)
    parser.add_argument("--train-iters", type=int, default=None, help="default: the demo config's")
    parser.add_argument(
        "--config",
        default="demo",
        choices=sorted(DEMOS),
        help="full SFT, LoRA, or full SFT of a mixture-of-experts model with expert parallelism",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="stream everything the steps and kfp.local print (default: one line as each step "
        "starts and ends; each step's full output goes to OUTPUT/logs/STEP.log)",
    )
    args = parser.parse_args(argv)

    root = Path(args.output or DEMOS[args.config][2]).resolve()
    if root.exists():
        shutil.rmtree(root)
    inputs = build_inputs(root / "inputs", args.train_problems, args.test_problems, args.config)
    config = demo_config(root, inputs, args.train_iters, args.config)
    result = run_local(config, workdir=root, quiet=not args.verbose)
    return 0 if result.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
