"""Inputs for the training tests, made here: a tiny tokenizer, prepared data, a tiny Llama.

`make_workspace` writes arithmetic word problems (the demo's generator), trains a small BPE
tokenizer, prepares the problems (packed and unpacked), builds a random 4-layer Llama sized
to the tokenizer (hidden 64, 4 heads in 2 key/value groups) and converts it to megatron-core;
a "sharp" copy whose output layer is scaled up, so that its predictions are far from uniform
(a random model's loss is about ln V on every token, which hides how tokens are weighted);
and a tiny random Qwen3-MoE on the same tokenizer. Every test in this folder shares the one
workspace (conftest.py). Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from megasft.checkpoint.convert import convert
from megasft.data.prepare import PrepareConfig, prepare
from megasft.data.store import EXAMPLE_SCHEMA, SplitWriter, open_split, split_file
from megasft.demo.model import build_tiny_llama, build_tiny_qwen3_moe
from megasft.demo.problems import write_problems
from megasft.demo.tokenizer import DEFAULT_CORPUS, build_tokenizer

SEQ_LENGTH = 128
SHARPNESS = 25.0
"""How much the sharp model's output layer is scaled up: its step-1 loss is several nats
above ln V and varies widely from token to token."""
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML without a default system prompt: shorter rows, faster tests."""


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
    overfit: Path
    """16 other problems, one per row."""
    with_val: Path
    """The problems packed, a quarter of them in the val split."""
    all_masked: Path
    """`packed` with no target token anywhere."""
    first_row_masked: Path
    """`unpacked` with no target token in its first row."""
    first_row_dropped: Path
    """`unpacked` without its first row."""
    problems: Path
    sharp_hf_model: Path
    """`hf_model` with its output layer times SHARPNESS: confident, mostly wrong predictions."""
    sharp_mcore_model: Path
    hf_moe_model: Path
    """A random Qwen3-MoE: 2 layers of 8 experts, top 2, hidden 64."""
    mcore_moe_model: Path

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({key: str(value) for key, value in asdict(self).items()}))


def make_workspace(root: Path, problems: int = 48, layers: int = 4) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    source = write_problems(root / "problems.jsonl", problems, seed=3)
    overfit_source = write_problems(root / "overfit.jsonl", 16, seed=4)
    corpus = [DEFAULT_CORPUS] + [
        json.loads(line)["question"] + " " + json.loads(line)["answer"]
        for line in source.read_text().splitlines()
    ]
    tokenizer = build_tokenizer(
        root / "tokenizer", chat_template=CHATML, corpus=corpus, vocab_size=400
    )
    for name, path, pack, val_fraction in (
        ("packed", source, True, 0.0),
        ("unpacked", source, False, 0.0),
        ("overfit", overfit_source, False, 0.0),
        ("with_val", source, True, 0.25),
    ):
        prepare(
            PrepareConfig(
                inputs=(str(path),),
                tokenizer=str(tokenizer),
                output=str(root / name),
                column_map=(("prompt", "question"), ("response", "answer")),
                seq_length=SEQ_LENGTH,
                pack=pack,
                val_fraction=val_fraction,
                workers=1,
                progress=False,
            )
        )
    _rewrite_train_split(root / "packed", root / "all_masked", lambda rows: _masked(rows, None))
    _rewrite_train_split(
        root / "unpacked", root / "first_row_masked", lambda rows: _masked(rows, 0)
    )
    _rewrite_train_split(root / "unpacked", root / "first_row_dropped", lambda rows: rows[1:])
    hf_model = build_tiny_llama(
        root / "hf", tokenizer, hidden_size=64, layers=layers, heads=4, kv_heads=2,
        max_positions=256,
    )  # fmt: skip
    convert("hf", "megatron", hf_model, root / "mcore")
    sharp_hf_model = _sharpened(hf_model, root / "hf_sharp")
    convert("hf", "megatron", sharp_hf_model, root / "mcore_sharp")
    hf_moe_model = build_tiny_qwen3_moe(
        root / "hf-moe", tokenizer, hidden_size=64, layers=2, heads=4, kv_heads=2,
        experts=8, experts_per_token=2, max_positions=256,
    )  # fmt: skip
    convert("hf", "megatron", hf_moe_model, root / "mcore-moe")
    return Workspace(
        root=root,
        tokenizer=tokenizer,
        hf_model=hf_model,
        mcore_model=root / "mcore",
        packed=root / "packed",
        unpacked=root / "unpacked",
        overfit=root / "overfit",
        with_val=root / "with_val",
        all_masked=root / "all_masked",
        first_row_masked=root / "first_row_masked",
        first_row_dropped=root / "first_row_dropped",
        problems=source,
        sharp_hf_model=sharp_hf_model,
        sharp_mcore_model=root / "mcore_sharp",
        hf_moe_model=hf_moe_model,
        mcore_moe_model=root / "mcore-moe",
    )


def _sharpened(hf_model: Path, destination: Path) -> Path:
    """A copy of `hf_model` whose output layer is scaled by SHARPNESS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPNESS)
    model.save_pretrained(destination)
    for path in hf_model.iterdir():  # the tokenizer and generation files
        if path.name.startswith(("tokenizer", "generation", "special_tokens")):
            shutil.copy(path, destination / path.name)
    return destination


def _masked(rows: list[dict], index: int | None) -> list[dict]:
    """`rows` with the loss mask of row `index` (every row for None) set to 0."""
    return [
        {**row, "loss_mask": [0] * len(row["loss_mask"])} if index in (None, i) else row
        for i, row in enumerate(rows)
    ]


def _rewrite_train_split(source: Path, destination: Path, change) -> None:
    """A copy of a prepared dataset whose train rows are `change(rows)`, in order."""
    shutil.copytree(source, destination)
    rows = change(open_split(source).to_pylist())
    writer = SplitWriter(split_file(destination, "train"))
    writer.write(pa.RecordBatch.from_pylist(rows, schema=EXAMPLE_SCHEMA))
    writer.close()
