"""Greedy generation: stops at the end-of-turn token, is deterministic, and batched equals
one-by-one exactly on a float32 model."""

from __future__ import annotations

import pytest
import torch

from megasft.data.conversation import Message
from megasft.data.tokenizer import load_chat_tokenizer
from megasft.demo.tokenizer import build_tokenizer
from megasft.evaluate.generate import GenerationSettings, generate_greedy
from megasft.evaluate.model import load_model, stop_token_ids
from megasft.evaluate.prompts import EvalExample, render_prompt
from tests.conftest import shared_path
from tests.data.styles import STYLES
from tests.evaluate.conftest import QA_ROWS

QUESTIONS = [
    "hello",
    "How many apples does Tom have? Tom has 3 apples and buys 5 more.",
    "What",
    "Please think step by step: 10 plus 20 minus 5 times 2, then the total left.",
    "the quick brown fox",
    "What is the answer? It is 42. Sure, here is the answer.",
    "numbers 0 1 2 3",
]


def _prompt_ids(chat_tokenizer, questions) -> list[list[int]]:
    return [
        render_prompt(chat_tokenizer, EvalExample("test", row, (Message("user", q),), None))[1]
        for row, q in enumerate(questions, start=1)
    ]


def _load(directory, tmp_path):
    return load_model(
        directory, None, torch.device("cpu"), torch.float32, False, tmp_path / "scratch"
    )


def _settings(loaded, **overrides) -> GenerationSettings:
    values = {
        "max_new_tokens": 12,
        "stop_token_ids": loaded.stop_token_ids,
        "pad_token_id": loaded.pad_token_id,
        "batch_size": 8,
    }
    values.update(overrides)
    return GenerationSettings(**values)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_stop_tokens_are_the_templates_end_of_turn(style, tmp_path):
    spec = STYLES[style]
    directory = build_tokenizer(
        tmp_path / style,
        chat_template=spec.template,
        special_tokens=spec.special_tokens,
        config=spec.config,
        post_processor_bos=spec.post_processor_bos,
    )
    chat_tokenizer = load_chat_tokenizer(directory)
    stop = stop_token_ids(chat_tokenizer)
    assert chat_tokenizer.tokenizer.id_to_token(stop[0]) == spec.end_of_turn
    eos = chat_tokenizer.tokenizer.token_to_id(chat_tokenizer.eos_token)
    assert set(stop) == {stop[0], eos}


def test_qwen_stops_at_im_end():
    chat_tokenizer = load_chat_tokenizer(shared_path("data", "tokenizers", "qwen2.5"))
    stop = stop_token_ids(chat_tokenizer)
    assert [chat_tokenizer.tokenizer.id_to_token(i) for i in stop] == ["<|im_end|>"]


def test_tuned_model_answers_and_stops_at_end_of_turn(tuned_model_dir, tmp_path):
    loaded = _load(tuned_model_dir, tmp_path)
    assert loaded.stop_token_ids == (loaded.chat_tokenizer.tokenizer.token_to_id("<|im_end|>"),)
    prompts = _prompt_ids(loaded.chat_tokenizer, [row["question"] for row in QA_ROWS])
    run = generate_greedy(loaded.model, prompts, _settings(loaded, max_new_tokens=40))
    decode = loaded.chat_tokenizer.tokenizer.decode
    answers = [decode(list(g.token_ids), skip_special_tokens=False) for g in run.generations]
    assert answers == [row["answer"] for row in QA_ROWS]
    assert all(generation.stopped for generation in run.generations)
    # Each answer's tokens plus the one end-of-turn token; nothing after it is counted.
    assert run.generated_tokens == sum(len(g.token_ids) + 1 for g in run.generations)


def test_untrained_model_runs_to_max_new_tokens(base_model_dir, tmp_path):
    loaded = _load(base_model_dir, tmp_path)
    prompts = _prompt_ids(loaded.chat_tokenizer, QUESTIONS)
    run = generate_greedy(loaded.model, prompts, _settings(loaded, max_new_tokens=7))
    for generation in run.generations:
        assert generation.stopped or len(generation.token_ids) == 7
        assert len(generation.token_ids) <= 7


@pytest.mark.parametrize("model", ["base", "tuned"])
def test_batched_equals_one_by_one_and_is_deterministic(
    model, base_model_dir, tuned_model_dir, tmp_path
):
    loaded = _load(base_model_dir if model == "base" else tuned_model_dir, tmp_path)
    questions = QUESTIONS + [row["question"] for row in QA_ROWS]
    prompts = _prompt_ids(loaded.chat_tokenizer, questions)
    assert len({len(prompt) for prompt in prompts}) > 4  # real padding in every batch
    one_by_one = generate_greedy(loaded.model, prompts, _settings(loaded, batch_size=1))
    batched = generate_greedy(loaded.model, prompts, _settings(loaded, batch_size=4))
    again = generate_greedy(loaded.model, prompts, _settings(loaded, batch_size=4))
    whole = generate_greedy(loaded.model, prompts, _settings(loaded, batch_size=len(prompts)))
    assert batched.generations == one_by_one.generations
    assert whole.generations == one_by_one.generations
    assert again.generations == batched.generations
    if model == "tuned":  # rows stop at different steps inside one batch
        stopped = [g.stopped for g in batched.generations]
        assert any(stopped)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0, stop_token_ids=(1,), pad_token_id=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        GenerationSettings(max_new_tokens=4, stop_token_ids=(), pad_token_id=0)


def test_empty_prompt_is_refused(base_model_dir, tmp_path):
    loaded = _load(base_model_dir, tmp_path)
    with pytest.raises(ValueError, match="at least one token"):
        generate_greedy(loaded.model, [[1, 2], []], _settings(loaded))
