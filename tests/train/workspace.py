"""Inputs for the training tests, made here: a tiny tokenizer, prepared data, a tiny Llama.

`make_workspace` writes arithmetic word problems (the demo's generator), trains a small BPE
tokenizer, prepares the problems (packed and unpacked), builds a random 4-layer Llama sized
to the tokenizer (hidden 64, 4 heads in 2 key/value groups) and converts it to megatron-core.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megasft.checkpoint.convert import convert
from megasft.data.prepare import PrepareConfig, prepare
from megasft.demo.model import build_tiny_llama
from megasft.demo.problems import write_problems
from megasft.demo.tokenizer import DEFAULT_CORPUS, build_tokenizer

SEQ_LENGTH = 256


@dataclass(frozen=True)
class Workspace:
    root: Path
    tokenizer: Path
    hf_model: Path
    mcore_model: Path
    packed: Path
    """Prepared problems, packed into rows of SEQ_LENGTH tokens."""
    unpacked: Path
    """The same problems, one per row."""
    problems: Path


def make_workspace(root: Path, problems: int = 48, layers: int = 4) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    source = write_problems(root / "problems.jsonl", problems, seed=3)
    corpus = [DEFAULT_CORPUS] + [
        json.loads(line)["question"] + " " + json.loads(line)["answer"]
        for line in source.read_text().splitlines()
    ]
    tokenizer = build_tokenizer(root / "tokenizer", corpus=corpus, vocab_size=400)
    datasets = {}
    for name, pack in (("packed", True), ("unpacked", False)):
        prepare(
            PrepareConfig(
                inputs=(str(source),),
                tokenizer=str(tokenizer),
                output=str(root / name),
                column_map=(("prompt", "question"), ("response", "answer")),
                seq_length=SEQ_LENGTH,
                pack=pack,
                val_fraction=0.0,
                workers=1,
                progress=False,
            )
        )
        datasets[name] = root / name
    hf_model = build_tiny_llama(
        root / "hf",
        tokenizer,
        hidden_size=64,
        layers=layers,
        heads=4,
        kv_heads=2,
        max_positions=256,
    )
    convert("hf", "megatron", hf_model, root / "mcore")
    return Workspace(
        root=root,
        tokenizer=tokenizer,
        hf_model=hf_model,
        mcore_model=root / "mcore",
        packed=datasets["packed"],
        unpacked=datasets["unpacked"],
        problems=source,
    )
