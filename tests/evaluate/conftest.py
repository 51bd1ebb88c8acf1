"""Tiny models for the evaluation tests, built and trained here (nothing is downloaded).

`base_model_dir` is a randomly initialised 2-layer Llama; `tuned_model_dir` is the same
model after a few hundred milliseconds of training on QA_ROWS, enough to answer those four
questions word for word and then emit `<|im_end|>`. Both are saved as Hugging Face
directories with the tiny ChatML tokenizer, so every test loads them the way a user's model
is loaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megasft.data.conversation import Message
from megasft.data.masking import ConversationMasker, MaskPolicy
from megasft.data.tokenizer import load_chat_tokenizer
from megasft.demo.tokenizer import DEFAULT_CORPUS, build_tokenizer
from megasft.train.loss import masked_token_loss

QA_ROWS = [
    {"question": "How many apples does Tom have?", "answer": "Tom has 8 apples.\n#### 8"},
    {"question": "What is 3 plus 5?", "answer": "<answer>8</answer>"},
    {"question": "What is the answer?", "answer": "It is 42.\n#### 42"},
    {"question": "hello world", "answer": "#### 12"},
]
"""GSM8K-shaped rows (`--map prompt=question,response=answer`) the tuned model has learned."""


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _save(model: LlamaForCausalLM, tokenizer_dir: Path, directory: Path) -> Path:
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def _train_on_qa(model: LlamaForCausalLM, tokenizer_dir: Path, steps: int = 150) -> None:
    """Overfits the model on QA_ROWS with the trainer's loss and prepare's masks."""
    masker = ConversationMasker(load_chat_tokenizer(tokenizer_dir), MaskPolicy())
    examples = [
        masker.mask([Message("user", row["question"]), Message("assistant", row["answer"])])
        for row in QA_ROWS
    ]
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), width, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.from_numpy(example.input_ids).long()
        loss_mask[row, : len(example.loss_mask)] = torch.from_numpy(example.loss_mask).long()
        attention_mask[row, : len(example.input_ids)] = 1
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss_sum, count = masked_token_loss(logits, input_ids, loss_mask)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        if (loss_sum / count).item() < 0.02:
            break
    model.eval()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    corpus = (DEFAULT_CORPUS, *(row["question"] + " " + row["answer"] for row in QA_ROWS))
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"), corpus=corpus)


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer_dir):
    return load_chat_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def vocab_size(chat_tokenizer) -> int:
    return chat_tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, tokenizer_dir, vocab_size) -> Path:
    return _save(tiny_llama(vocab_size), tokenizer_dir, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def tuned_model_dir(tmp_path_factory, tokenizer_dir, vocab_size) -> Path:
    model = tiny_llama(vocab_size)
    with one_torch_thread():  # session fixtures are set up before the autouse one applies
        _train_on_qa(model, tokenizer_dir)
    return _save(model, tokenizer_dir, tmp_path_factory.mktemp("tuned"))


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", QA_ROWS)


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models run faster on one thread than on two contended ones (the test machines
    have two cores, shared); the setting is restored afterwards for other tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, qa_file, tokenizer_dir) -> Path:
    """QA_ROWS through `megasft prepare`, packed: all in the train split, several per row."""
    from megasft.data.prepare import PrepareConfig, prepare

    output = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        PrepareConfig(
            inputs=(str(qa_file),),
            tokenizer=str(tokenizer_dir),
            output=str(output),
            column_map=(("prompt", "question"), ("response", "answer")),
            seq_length=96,
            val_fraction=0.0,
            workers=1,
            progress=False,
        )
    )
    return output
