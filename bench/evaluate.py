"""Benchmark of `megasft evaluate`'s generation: batched vs one-by-one greedy decoding on CPU.

    python bench/evaluate.py [--prompts 32] [--max-new-tokens 64] [--batch-sizes 1 8 16]

A randomly initialised Llama-shaped model (hidden 256, 4 layers, 8 heads, 4 KV heads; the
vocabulary of a tiny BPE tokenizer trained here) answers the same prompts (GSM8K test
questions from ../shared when present, generated word problems otherwise) at each batch size,
through the same `generate_greedy` the stage uses, with a KV cache, left padding and the
end-of-turn stop token. Printed side by side from one run: generated tokens/s per batch size
and the speed-up over one-by-one, and whether every batch size produced exactly the same
answers (it must: float32, and padding that is masked out).

Not a test: it asserts nothing. Random weights rarely emit the end-of-turn token, so almost
every answer runs to --max-new-tokens; that keeps the token counts equal across batch sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megasft.data.conversation import Message
from megasft.data.tokenizer import load_chat_tokenizer
from megasft.demo.tokenizer import DEFAULT_CORPUS, build_tokenizer
from megasft.evaluate.generate import GenerationSettings, generate_greedy
from megasft.evaluate.model import stop_token_ids
from megasft.evaluate.prompts import EvalExample, render_prompt

REPO = Path(__file__).resolve().parents[1]
GSM8K_TEST = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def questions(count: int) -> tuple[list[str], str]:
    if GSM8K_TEST.is_file():
        with open(GSM8K_TEST, encoding="utf-8") as file:
            lines = file.read().splitlines()[:count]
        rows = [json.loads(line)["question"] for line in lines]
        return rows, f"GSM8K test ({GSM8K_TEST})"
    generated = [
        f"Tom has {i} apples and buys {i + 3} more. He gives {i % 4} away. "
        f"How many apples does he have left?" + " Please think step by step." * (i % 3)
        for i in range(count)
    ]
    return generated, "generated word problems"


def build_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    texts, source = questions(args.prompts)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = build_tokenizer(
            Path(scratch) / "tokenizer", corpus=(DEFAULT_CORPUS, *texts), vocab_size=2000
        )
        chat_tokenizer = load_chat_tokenizer(tokenizer_dir)
    vocab_size = chat_tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    model = build_model(vocab_size)
    prompts = [
        render_prompt(chat_tokenizer, EvalExample("bench", row, (Message("user", text),), None))[1]
        for row, text in enumerate(texts, start=1)
    ]
    stop = stop_token_ids(chat_tokenizer)
    lengths = sorted(len(prompt) for prompt in prompts)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama, hidden 256, 4 layers, vocab {vocab_size}, {parameters / 1e6:.1f}M "
        f"parameters, float32, CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} torch threads"
    )
    print(
        f"prompts: {len(prompts)} from {source}, {lengths[0]}-{lengths[-1]} tokens "
        f"(median {lengths[len(lengths) // 2]}); greedy, max {args.max_new_tokens} new tokens\n"
    )

    # One untimed warm-up so that lazy initialisation is not billed to the first mode.
    warm = GenerationSettings(max_new_tokens=4, stop_token_ids=stop, pad_token_id=0, batch_size=4)
    generate_greedy(model, prompts[:4], warm)

    results = {}
    for batch_size in args.batch_sizes:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            stop_token_ids=stop,
            pad_token_id=0,
            batch_size=batch_size,
        )
        started = time.perf_counter()
        run = generate_greedy(model, prompts, settings)
        results[batch_size] = (run, time.perf_counter() - started)

    baseline = results[args.batch_sizes[0]][0]
    header = f"{'mode':>14} | {'tokens':>7} | {'seconds':>8} | {'tokens/s':>9} | {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for batch_size, (run, _) in results.items():
        mode = "one-by-one" if batch_size == 1 else f"batch {batch_size}"
        speedup = run.tokens_per_second / baseline.tokens_per_second
        print(
            f"{mode:>14} | {run.generated_tokens:7d} | {run.seconds:8.2f} | "
            f"{run.tokens_per_second:9.1f} | {speedup:7.2f}x"
        )
    same = all(run.generations == baseline.generations for run, _ in results.values())
    stopped = sum(g.stopped for g in baseline.generations)
    print(
        f"\nidentical answers at every batch size: {'yes' if same else 'NO'}; "
        f"{stopped} of {len(prompts)} answers ended at the end-of-turn token"
    )


if __name__ == "__main__":
    main()
