"""megasft.data.formats: the registry, detection, column maps, system prompts, one format per
file, and whole files of good and bad rows."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import ClassVar

import pytest

from megasft.data.conversation import Conversation, Message, RowError
from megasft.data.formats import (
    FORMATS,
    FileFormats,
    InputFormat,
    RowConverter,
    canonical_fields,
    detect_format,
    input_formats,
    parse_column_map,
    registry,
)
from megasft.data.formats.fields import required_text
from megasft.data.readers import iter_raw_rows, parse_payload
from megasft.errors import ConfigError
from tests.data.formats.conftest import A, S, U, convert, error_for, rejected

GSM8K_TRAIN = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
)

# --- the registry ------------------------------------------------------------------------------


def test_formats_in_detection_order():
    assert FORMATS == ("messages", "sharegpt", "alpaca", "prompt-response")
    assert tuple(input_formats()) == FORMATS
    assert canonical_fields() == (
        "messages",
        "tools",
        "conversations",
        "system",
        "instruction",
        "input",
        "output",
        "prompt",
        "response",
        "completion",
    )


class _Plain(InputFormat):
    """A format of the test's own: {"text": ..., "reply": ...}."""

    name = "plain"
    detection_key = "text"
    detection_rank = 50
    fields: ClassVar = ("text", "reply")
    needs = "'text' and 'reply'"
    shape = "'text' + 'reply'"

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        text = required_text(record, "text", source, row)
        reply = required_text(record, "reply", source, row)
        return Conversation(self.name, [Message(U, text), Message(A, reply)])

    def with_answer(self, record, answer, column_map):
        return {**record, column_map.get("reply", "reply"): answer}


def test_a_new_format_is_one_registered_class(monkeypatch):
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    registry.register_format(_Plain)
    assert convert({"words": "hi", "reply": "ho"}, column_map={"text": "words"}) == [
        Message(U, "hi"),
        Message(A, "ho"),
    ]
    assert parse_column_map("reply=answer") == {"reply": "answer"}
    assert rejected({"text": "hi"}) == ("reply", "missing_field")
    assert "plain rows need 'text' and 'reply'" in error_for({"text": "hi"}).message
    assert "or 'text' + 'reply'." in error_for({"other": 1}).message
    # The formats before it still win for rows that have their keys too.
    assert detect_format({"text": "t", "prompt": "p"}) == "prompt-response"


def test_two_formats_cannot_share_a_name_a_detection_key_or_a_rank(monkeypatch):
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    for clash in ({"name": "alpaca"}, {"detection_key": "prompt"}, {"detection_rank": 10}):
        with pytest.raises(ValueError, match="share their"):
            registry.register_format(type("Clash", (_Plain,), clash))


# --- format detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": [], "conversations": [], "instruction": "", "prompt": ""}, "messages"),
        ({"conversations": [], "instruction": "", "prompt": ""}, "sharegpt"),
        ({"instruction": "", "prompt": "", "output": ""}, "alpaca"),
        ({"prompt": "", "completion": ""}, "prompt-response"),
        ({"messages": None, "prompt": "p"}, "prompt-response"),  # null means absent
        ({"response": "r", "output": "o"}, None),
        ({}, None),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_through_a_column_map():
    record = {"question": "q", "answer": "a"}
    assert detect_format(record, {"prompt": "question", "response": "answer"}) == "prompt-response"
    assert detect_format(record, {"messages": "dialog"}) is None


@pytest.mark.parametrize(
    "record", [{"question": "q", "answer": "a"}, {"messages": None, "prompt": None}, {}]
)
def test_a_row_of_no_format_is_unknown_format(record):
    assert rejected(record) == (None, "unknown_format")


def test_unknown_format_lists_the_keys_and_mentions_map():
    error = error_for({"question": "q", "answer": "a"})
    assert "'question', 'answer'" in error.message
    assert "'messages'" in error.message and "'instruction'" in error.message
    assert "--map" in error.message


def test_a_missing_field_of_another_format_says_to_check_format():
    error = error_for({"prompt": "p", "response": "r"}, "alpaca")
    assert "looks like prompt-response format, not alpaca" in error.message


def test_a_converter_refuses_an_unknown_format():
    with pytest.raises(ConfigError, match="unknown --format 'chatml'"):
        RowConverter("chatml")


def test_a_converter_with_a_fixed_format_pickles():
    converter = RowConverter("prompt-response", {"prompt": "q", "response": "a"}, "Sys")
    clone = pickle.loads(pickle.dumps(converter))
    assert clone.convert({"q": "1", "a": "2"}, "f", 1) == Conversation(
        "prompt-response", [Message(S, "Sys"), Message(U, "1"), Message(A, "2")]
    )
    with pytest.raises(RowError) as caught:
        clone.convert({"instruction": "i", "output": "o", "q": "1", "a": None}, "f", 2)
    assert (caught.value.field, caught.value.reason) == ("a", "missing_field")


# --- one format per file -----------------------------------------------------------------------


def test_each_file_is_locked_to_its_first_format():
    file_formats = FileFormats()
    assert file_formats.check("a.jsonl", 2, "alpaca") is None
    assert file_formats.check("b.jsonl", 1, "sharegpt") is None  # another file, another format
    error = file_formats.check("a.jsonl", 3, "sharegpt")
    assert (error.source, error.row, error.field, error.reason) == (
        "a.jsonl",
        3,
        None,
        "mixed_formats",
    )
    assert "sharegpt" in error.message and "alpaca" in error.message
    assert "--format" in error.message and "Split" in error.message
    assert file_formats.check("a.jsonl", 4, "alpaca") is None
    assert file_formats.by_source == {"a.jsonl": "alpaca", "b.jsonl": "sharegpt"}


# --- column maps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("prompt=question,response=answer", {"prompt": "question", "response": "answer"}),
        (" prompt = question , response=answer ", {"prompt": "question", "response": "answer"}),
        ("messages=dialog", {"messages": "dialog"}),
        ("prompt=text,response=text", {"prompt": "text", "response": "text"}),
        ("", {}),
        ("  ", {}),
    ],
)
def test_parse_column_map(text, expected):
    assert parse_column_map(text) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("prompt", "'prompt' is not CANONICAL=COLUMN"),
        ("prompt=", "'prompt=' is not CANONICAL=COLUMN"),
        ("=question", "'=question' is not CANONICAL=COLUMN"),
        ("prompt=q,,response=a", "'' is not CANONICAL=COLUMN"),
        ("prompt=q,", "'' is not CANONICAL=COLUMN"),
        ("prompt=a,prompt=b", "'prompt' is mapped twice"),
        ("question=prompt", "did you mean prompt=question"),
        ("promt=question", "did you mean 'prompt'"),
        ("label=y", "'label' is not a field any format reads"),
    ],
)
def test_parse_column_map_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_column_map(text)


GSM8K_MAP = {"prompt": "question", "response": "answer"}


def test_gsm8k_style_mapping():
    record = {"question": "What is 2+2?", "answer": "2+2 = 4\n#### 4"}
    assert convert(record, "auto", column_map=GSM8K_MAP) == [
        Message(U, "What is 2+2?"),
        Message(A, "2+2 = 4\n#### 4"),
    ]
    assert convert(record, "prompt-response", column_map=GSM8K_MAP)[1].role == A


def test_column_map_errors_name_the_source_column():
    assert rejected({"question": "q"}, column_map=GSM8K_MAP) == ("answer", "missing_field")
    assert "--map response=answer" in error_for({"question": "q"}, column_map=GSM8K_MAP).message
    assert rejected({"question": "q", "answer": None}, column_map=GSM8K_MAP) == (
        "answer",
        "missing_field",
    )
    assert rejected({"question": 1, "answer": "a"}, column_map=GSM8K_MAP) == (
        "question",
        "wrong_type",
    )
    dialog = {"dialog": [{"role": U, "content": "q"}, {"role": "bot", "content": "a"}]}
    assert rejected(dialog, column_map={"messages": "dialog"}) == ("dialog[1].role", "unknown_role")
    # Swapped columns read the original values, not the already mapped ones.
    swapped = {"prompt": "the answer", "response": "the question"}
    assert convert(swapped, column_map={"prompt": "response", "response": "prompt"}) == [
        Message(U, "the question"),
        Message(A, "the answer"),
    ]


def test_unknown_format_under_a_map_lists_the_input_columns():
    error = error_for({"q": None, "a": "x"}, column_map={"prompt": "q", "response": "a"})
    assert error.reason == "unknown_format"
    assert "['q', 'a']" in error.message


def test_a_row_without_a_mapped_column_is_detected_before_the_map_applies():
    # As prepare has always read such rows: no format recognised, so unknown_format, not the
    # missing column (which a row of the mapped format is told about, above).
    error = error_for({"foo": 1}, column_map=GSM8K_MAP)
    assert (error.field, error.reason) == (None, "unknown_format")


def test_with_answer_detects_the_format_through_the_map():
    converter = RowConverter(column_map=GSM8K_MAP)
    assert converter.with_answer({"question": "q"}, "x") == {"question": "q", "answer": "x"}
    assert converter.with_answer({"other": "q"}, "x") is None
    fixed = RowConverter("alpaca")
    assert fixed.with_answer({"prompt": "p"}, "x") == {"prompt": "p", "output": "x"}


# --- system prompt -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "p", "response": "r"},
        {"instruction": "p", "output": "r", "system": ""},
        {"messages": [{"role": U, "content": "p"}, {"role": A, "content": "r"}]},
        {"conversations": [{"from": "human", "value": "p"}, {"from": "gpt", "value": "r"}]},
    ],
)
def test_system_prompt_is_added_when_there_is_no_system_message(record):
    assert convert(record, system_prompt="Be brief.") == [
        Message(S, "Be brief."),
        Message(U, "p"),
        Message(A, "r"),
    ]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "p", "response": "r", "system": "Own."},
        {"messages": [{"role": S, "content": "Own."}, {"role": U, "content": "p"}, {"role": A, "content": "r"}]},
        {"conversations": [{"from": "human", "value": "p"}, {"from": "gpt", "value": "r"}], "system": "Own."},
    ],
)  # fmt: skip
def test_system_prompt_keeps_a_system_message_from_the_data(record):
    assert convert(record, system_prompt="Be brief.") == [
        Message(S, "Own."),
        Message(U, "p"),
        Message(A, "r"),
    ]


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_no_system_prompt(system_prompt):
    assert convert({"prompt": "p", "response": "r"}, system_prompt=system_prompt) == [
        Message(U, "p"),
        Message(A, "r"),
    ]


# --- files end to end --------------------------------------------------------------------------


def _read_file(path, converter: RowConverter):
    """(row, messages) of the good rows and (row, field, reason) of the bad ones, as prepare
    reads them (`FileFormats` after the conversion)."""
    file_formats = FileFormats()
    kept, errors = [], []
    for item in iter_raw_rows(path):
        try:
            if isinstance(item, RowError):
                raise item
            conversation = converter.convert(parse_payload(item), item.source, item.row)
            mixed = file_formats.check(item.source, item.row, conversation.format)
            if mixed is not None:
                raise mixed
            kept.append((item.row, conversation.messages))
        except RowError as error:
            errors.append((error.row, error.field, error.reason))
    return kept, errors


def test_bad_input_corpus_rejects_exactly_the_bad_rows(tmp_path):
    """One file with every kind of bad row between good ones: the good rows all survive."""
    good = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]}
    lines = [
        json.dumps(good),  # 1
        '{"messages": [{"role": "user", "content": "q"}, ',  # 2: malformed
        json.dumps({"messages": [{"role": "user", "content": 1}, {"role": A, "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # 4
        "",  # 5: blank
        json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": A, "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": A, "content": ""}]}),
        json.dumps(good),  # 8
        '{"messages": "caf\xe9"}',  # 9: written as Latin-1 below
        json.dumps(
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
        ),
        json.dumps({"text": "no format"}),  # 11
        json.dumps({"messages": [{"content": "q"}, {"role": A, "content": "a"}]}),  # 12
        "[]",  # 13
        json.dumps({"messages": []}),  # 14
        json.dumps(good),  # 15
    ]
    data = "\n".join(lines).encode("utf-8").replace("caf\xe9".encode(), b"caf\xe9")
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(data)
    kept, errors = _read_file(path, RowConverter())
    good_messages = [Message(U, "q"), Message(A, "a")]
    assert kept == [(1, good_messages), (8, good_messages), (15, good_messages)]
    assert errors == [
        (2, None, "malformed_json"),
        (3, "messages[0].content", "wrong_type"),
        (4, "messages", "no_assistant_turn"),
        (6, "messages[0].role", "unknown_role"),
        (7, "messages[1].content", "empty_assistant"),
        (9, None, "invalid_utf8"),
        (10, None, "mixed_formats"),
        (11, None, "unknown_format"),
        (12, "messages[0].role", "missing_field"),
        (13, None, "not_an_object"),
        (14, "messages", "empty_conversation"),
    ]


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"{GSM8K_TRAIN} is not there")
def test_all_of_gsm8k_train_converts_with_a_prompt_response_map():
    kept, errors = _read_file(
        GSM8K_TRAIN, RowConverter(column_map=parse_column_map("prompt=question,response=answer"))
    )
    assert errors == []
    assert len(kept) == 7473
    for _, messages in kept:
        assert [message.role for message in messages] == [U, A]
        assert "####" in messages[1].content
