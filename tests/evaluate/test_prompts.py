"""Evaluation examples from data files: prompt = conversation minus the final answer."""

from __future__ import annotations

import gzip
import json

import pytest

from megasft.data.conversation import Message
from megasft.errors import InputError
from megasft.evaluate.prompts import EvalExample, read_eval_examples, render_prompt
from tests.evaluate.conftest import write_jsonl

GSM8K_MAP = {"prompt": "question", "response": "answer"}


def test_gsm8k_rows_with_a_column_map(qa_file):
    examples = read_eval_examples(qa_file, column_map=GSM8K_MAP)
    assert examples[0] == EvalExample(
        str(qa_file),
        1,
        (Message("user", "How many apples does Tom have?"),),
        "Tom has 8 apples.\n#### 8",
    )
    assert [example.row for example in examples] == [1, 2, 3, 4]
    assert len(read_eval_examples(qa_file, column_map=GSM8K_MAP, limit=2)) == 2


def test_every_input_format(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ]
        },
    ]
    messages = read_eval_examples(write_jsonl(tmp_path / "m.jsonl", rows))[0]
    assert messages.prompt == (
        Message("system", "S"),
        Message("user", "Q1"),
        Message("assistant", "A1"),
        Message("user", "Q2"),
    )
    assert messages.reference == "A2"

    sharegpt = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    assert read_eval_examples(write_jsonl(tmp_path / "s.jsonl", sharegpt))[0].reference == "A"

    alpaca = [{"instruction": "Add", "input": "2 and 3", "output": "5"}]
    example = read_eval_examples(write_jsonl(tmp_path / "a.jsonl", alpaca))[0]
    assert example.prompt == (Message("user", "Add\n\n2 and 3"),) and example.reference == "5"

    gzipped = tmp_path / "p.jsonl.gz"
    gzipped.write_bytes(gzip.compress(b'{"prompt": "Q", "completion": "A"}\n'))
    assert read_eval_examples(gzipped)[0].reference == "A"


def test_system_prompt_is_added_where_missing(qa_file):
    example = read_eval_examples(qa_file, column_map=GSM8K_MAP, system_prompt="Be brief.")[0]
    assert example.prompt[0] == Message("system", "Be brief.")


def test_reference_field_and_prompt_only_rows(tmp_path):
    rows = [{"prompt": "2+2?", "label": 4}, {"prompt": "Capital of France?", "label": "Paris"}]
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    examples = read_eval_examples(path, reference_field="label")
    assert [example.reference for example in examples] == ["4", "Paris"]
    assert examples[0].prompt == (Message("user", "2+2?"),)

    # No reference needed (the format task): prompt-only rows in every format.
    chats = [{"messages": [{"role": "user", "content": "Hi"}]}]
    examples = read_eval_examples(
        write_jsonl(tmp_path / "c.jsonl", chats), reference_required=False
    )
    assert examples == [EvalExample(str(tmp_path / "c.jsonl"), 1, (Message("user", "Hi"),), None)]
    alpaca = [{"instruction": "Say hi"}]
    examples = read_eval_examples(
        write_jsonl(tmp_path / "i.jsonl", alpaca), reference_required=False
    )
    assert examples[0].prompt == (Message("user", "Say hi"),) and examples[0].reference is None


def test_missing_answer_names_row_and_column(tmp_path):
    rows = [{"question": "Q", "answer": "#### 1"}, {"question": "Q2"}, {"answer": "#### 3"}]
    with pytest.raises(InputError) as error:
        read_eval_examples(write_jsonl(tmp_path / "bad.jsonl", rows), column_map=GSM8K_MAP)
    message = str(error.value)
    assert "2 row(s)" in message
    assert "row 2, field 'answer'" in message
    assert "row 3" in message and "'question'" in message


def test_missing_reference_field(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Q", "response": "A"}])
    with pytest.raises(InputError, match="--reference-field gold names a column"):
        read_eval_examples(path, reference_field="gold")


def test_conversation_must_end_with_the_answer(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "and?"},
            ]
        }
    ]
    with pytest.raises(InputError, match="ends with a user message"):
        read_eval_examples(write_jsonl(tmp_path / "x.jsonl", rows))


def test_empty_and_broken_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        read_eval_examples(empty)
    with pytest.raises(InputError, match="no such file"):
        read_eval_examples(tmp_path / "absent.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Q", "response": "A"}\n{"prompt": \n')
    with pytest.raises(InputError, match="row 2.*not valid JSON"):
        read_eval_examples(broken)


def test_many_bad_rows_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"nothing": i} for i in range(9)])
    with pytest.raises(InputError, match=r"9 row\(s\)[\s\S]*and 4 more"):
        read_eval_examples(path)


def test_render_prompt_adds_the_generation_prompt(chat_tokenizer):
    example = EvalExample("f", 1, (Message("user", "hello world"),), "x")
    text, ids = render_prompt(chat_tokenizer, example)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_tokenizer.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert json.dumps(ids)  # plain ints
