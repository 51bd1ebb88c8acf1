"""megasft.data.formats: each input format to messages, and each way a record can be wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from megasft.data.conversation import Message, RowError
from megasft.data.formats import (
    FORMATS,
    SHAREGPT_ROLES,
    RowConverter,
    detect_format,
    parse_column_map,
    to_messages,
)
from megasft.data.readers import iter_raw_rows, parse_payload
from megasft.errors import ConfigError

GSM8K_TRAIN = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
)

S, U, A, T = "system", "user", "assistant", "tool"


def rejected(record: dict, fmt: str = "auto", **options) -> tuple[str | None, str]:
    """(field, reason) of the RowError that converting `record` raises."""
    with pytest.raises(RowError) as caught:
        to_messages(record, fmt, "in.jsonl", 5, **options)
    error = caught.value
    assert (error.source, error.row) == ("in.jsonl", 5)
    return error.field, error.reason


def error_for(record: dict, fmt: str = "auto", **options) -> RowError:
    with pytest.raises(RowError) as caught:
        to_messages(record, fmt, "in.jsonl", 5, **options)
    return caught.value


# --- the formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, expected",
    [
        (
            {"instruction": "Add.", "input": "2, 2", "output": "4"},
            [Message(U, "Add.\n\n2, 2"), Message(A, "4")],
        ),
        (
            {"instruction": "Hi", "input": "", "output": "Hello"},
            [Message(U, "Hi"), Message(A, "Hello")],
        ),
        (
            {"instruction": "Hi", "input": None, "output": "Yo"},
            [Message(U, "Hi"), Message(A, "Yo")],
        ),
        ({"instruction": "Hi", "output": "Yo", "id": 7}, [Message(U, "Hi"), Message(A, "Yo")]),
        (
            {"instruction": "Hi", "output": "Yo", "system": "Be brief."},
            [Message(S, "Be brief."), Message(U, "Hi"), Message(A, "Yo")],
        ),
        ({"instruction": "Hi", "output": "Yo", "system": ""}, [Message(U, "Hi"), Message(A, "Yo")]),
    ],
)
def test_alpaca(record, expected):
    assert detect_format(record) == "alpaca"
    assert to_messages(record, "alpaca", "in.jsonl", 1) == expected


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "2+2?", "response": "4"}, [Message(U, "2+2?"), Message(A, "4")]),
        ({"prompt": "2+2?", "completion": " 4"}, [Message(U, "2+2?"), Message(A, " 4")]),
        (
            {"prompt": "2+2?", "response": "4", "completion": "ignored"},
            [Message(U, "2+2?"), Message(A, "4")],
        ),
        (
            {"prompt": "p", "response": "r", "system": "s"},
            [Message(S, "s"), Message(U, "p"), Message(A, "r")],
        ),
    ],
)
def test_prompt_response(record, expected):
    assert detect_format(record) == "prompt-response"
    assert to_messages(record, "prompt-response", "in.jsonl", 1) == expected


def test_openai_messages_keep_content_byte_for_byte():
    record = {
        "messages": [
            {"role": "system", "content": "  You help.\n"},
            {"role": "user", "content": "Weather?\r\n", "name": "ann"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": None},
            {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "c1"},
            {"role": "assistant", "content": " Cold. "},
        ],
        "id": "x",
    }
    assert detect_format(record) == "messages"
    assert to_messages(record, "messages", "in.jsonl", 1) == [
        Message(S, "  You help.\n"),
        Message(U, "Weather?\r\n"),
        Message(A, "Let me look."),
        Message(T, '{"temp": 3}'),
        Message(A, " Cold. "),
    ]


def test_openai_list_of_text_parts_is_joined_without_separator():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world", "extra": 1}]
    record = {"messages": [{"role": U, "content": parts}, {"role": A, "content": parts}]}
    assert to_messages(record, "messages", "f", 1) == [
        Message(U, "Hello world"),
        Message(A, "Hello world"),
    ]


def test_an_empty_list_of_parts_is_empty_content():
    record = {"messages": [{"role": U, "content": []}, {"role": A, "content": "a"}]}
    assert to_messages(record, "messages", "f", 1)[0] == Message(U, "")
    record = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": []}]}
    assert rejected(record) == ("messages[1].content", "empty_assistant")


@pytest.mark.parametrize("source_role, role", sorted(SHAREGPT_ROLES.items()))
def test_sharegpt_role_mapping(source_role, role):
    turns = [{"from": source_role, "value": "x"}]
    if role != A:
        turns.append({"from": "gpt", "value": "y"})
    messages = to_messages({"conversations": turns}, "sharegpt", "in.jsonl", 1)
    assert messages[0] == Message(role, "x")


def test_sharegpt_role_table_is_exactly_the_documented_one():
    assert SHAREGPT_ROLES == {
        "human": U,
        "gpt": A,
        "system": S,
        "function_call": A,
        "observation": T,
        "user": U,
        "assistant": A,
        "tool": T,
    }


def test_sharegpt_top_level_system_leads():
    record = {
        "system": "Be kind.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    assert detect_format(record) == "sharegpt"
    assert to_messages(record, "sharegpt", "in.jsonl", 1) == [
        Message(S, "Be kind."),
        Message(U, "Hi"),
        Message(A, "Hello"),
    ]


def test_a_conversation_may_start_with_the_assistant():
    record = {"messages": [{"role": A, "content": "Hi!"}, {"role": U, "content": "Hey"}]}
    assert to_messages(record, "messages", "in.jsonl", 1) == [Message(A, "Hi!"), Message(U, "Hey")]


# --- per-message training flags ----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, train",
    [
        ({}, True),
        ({"train": True}, True),
        ({"train": False}, False),
        ({"loss_weight": 1}, True),
        ({"loss_weight": 1.0}, True),
        ({"loss_weight": 0}, False),
        ({"loss_weight": 0.0}, False),
        ({"train": None, "loss_weight": None}, True),  # Parquet's nulls for absent fields
        ({"train": False, "loss_weight": 0}, False),
    ],
)
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_per_message_train_flags(flags, train, fmt):
    if fmt == "messages":
        turns = [{"role": U, "content": "q", **flags}, {"role": A, "content": "a", **flags}]
        record = {"messages": turns}
    else:
        turns = [{"from": "human", "value": "q", **flags}, {"from": "gpt", "value": "a", **flags}]
        record = {"conversations": turns}
    assert to_messages(record, fmt, "in.jsonl", 1) == [
        Message(U, "q", train),
        Message(A, "a", train),
    ]


@pytest.mark.parametrize(
    "flags, field, reason",
    [
        ({"loss_weight": 0.5}, "messages[1].loss_weight", "unsupported_loss_weight"),
        ({"loss_weight": 2}, "messages[1].loss_weight", "unsupported_loss_weight"),
        ({"loss_weight": "0"}, "messages[1].loss_weight", "wrong_type"),
        ({"loss_weight": True}, "messages[1].loss_weight", "wrong_type"),
        ({"train": "no"}, "messages[1].train", "wrong_type"),
        ({"train": 0}, "messages[1].train", "wrong_type"),
        ({"train": True, "loss_weight": 0}, "messages[1]", "conflicting_train_flags"),
    ],
)
def test_bad_train_flags(flags, field, reason):
    record = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a", **flags}]}
    assert rejected(record) == (field, reason)


def test_unsupported_loss_weight_says_what_is_supported():
    record = {
        "messages": [{"role": U, "content": "q"}, {"role": A, "content": "a", "loss_weight": 0.5}]
    }
    assert "only 0" in error_for(record).message


# --- validation --------------------------------------------------------------------------------

USER = {"role": U, "content": "q"}
ASSISTANT = {"role": A, "content": "a"}


@pytest.mark.parametrize(
    "record, fmt, field, reason",
    [
        # Alpaca
        ({"instruction": "i"}, "auto", "output", "missing_field"),
        ({"instruction": "i", "output": None}, "auto", "output", "missing_field"),
        ({"instruction": 3, "output": "o"}, "auto", "instruction", "wrong_type"),
        ({"instruction": "i", "output": ["o"]}, "auto", "output", "wrong_type"),
        ({"instruction": "i", "input": 1, "output": "o"}, "auto", "input", "wrong_type"),
        ({"instruction": "i", "output": "o", "system": 1}, "auto", "system", "wrong_type"),
        ({"instruction": "i", "output": ""}, "auto", "output", "empty_assistant"),
        ({"instruction": "i", "output": " \n\t"}, "auto", "output", "empty_assistant"),
        ({"output": "o"}, "alpaca", "instruction", "missing_field"),
        # prompt/response
        ({"prompt": "p"}, "auto", "response", "missing_field"),
        ({"prompt": "p", "response": None, "completion": None}, "auto", "response", "missing_field"),
        ({"prompt": "p", "completion": 4}, "auto", "completion", "wrong_type"),
        ({"prompt": "p", "response": "  "}, "auto", "response", "empty_assistant"),
        ({"prompt": {"text": "p"}, "response": "r"}, "auto", "prompt", "wrong_type"),
        # OpenAI messages
        ({"messages": "hi"}, "auto", "messages", "wrong_type"),
        ({"messages": {"role": U}}, "auto", "messages", "wrong_type"),
        ({"messages": []}, "auto", "messages", "empty_conversation"),
        ({"prompt": "p"}, "messages", "messages", "missing_field"),
        ({"messages": [USER, "a"]}, "auto", "messages[1]", "wrong_type"),
        ({"messages": [USER, {"content": "a"}]}, "auto", "messages[1].role", "missing_field"),
        ({"messages": [USER, {"role": 1, "content": "a"}]}, "auto", "messages[1].role", "wrong_type"),
        ({"messages": [USER, {"role": "bot", "content": "a"}]}, "auto", "messages[1].role", "unknown_role"),
        ({"messages": [USER, {"role": "gpt", "content": "a"}]}, "auto", "messages[1].role", "unknown_role"),
        ({"messages": [USER, {"role": "Assistant", "content": "a"}]}, "auto", "messages[1].role", "unknown_role"),
        ({"messages": [{"role": U}, ASSISTANT]}, "auto", "messages[0].content", "missing_field"),
        ({"messages": [{"role": U, "content": None}, ASSISTANT]}, "auto", "messages[0].content", "missing_field"),
        ({"messages": [{"role": U, "content": 5}, ASSISTANT]}, "auto", "messages[0].content", "wrong_type"),
        ({"messages": [{"role": U, "content": {"text": "q"}}, ASSISTANT]}, "auto", "messages[0].content", "wrong_type"),
        ({"messages": [USER, {"role": A}]}, "auto", "messages[1].content", "empty_assistant"),
        ({"messages": [USER, {"role": A, "content": None}]}, "auto", "messages[1].content", "empty_assistant"),
        ({"messages": [USER, {"role": A, "content": ""}]}, "auto", "messages[1].content", "empty_assistant"),
        ({"messages": [USER, {"role": A, "content": "\n "}]}, "auto", "messages[1].content", "empty_assistant"),
        ({"messages": [USER, {"role": A, "content": None, "tool_calls": [{"id": "c1"}]}]}, "auto", "messages[1].tool_calls", "unsupported_tool_calls"),
        ({"messages": [USER]}, "auto", "messages", "no_assistant_turn"),
        ({"messages": [{"role": S, "content": "s"}, USER, {"role": T, "content": "t"}]}, "auto", "messages", "no_assistant_turn"),
        ({"messages": [USER, ASSISTANT, {"role": U, "content": "x"}, {"role": A, "content": " "}]}, "auto", "messages[3].content", "empty_assistant"),
        # content parts
        ({"messages": [{"role": U, "content": [{"type": "image_url", "image_url": {}}]}, ASSISTANT]}, "auto", "messages[0].content[0].type", "unsupported_content"),
        ({"messages": [{"role": U, "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}, ASSISTANT]}, "auto", "messages[0].content[1].type", "unsupported_content"),
        ({"messages": [{"role": U, "content": [{"text": "a"}]}, ASSISTANT]}, "auto", "messages[0].content[0].type", "missing_field"),
        ({"messages": [{"role": U, "content": [{"type": 1}]}, ASSISTANT]}, "auto", "messages[0].content[0].type", "wrong_type"),
        ({"messages": [{"role": U, "content": [{"type": "text"}]}, ASSISTANT]}, "auto", "messages[0].content[0].text", "missing_field"),
        ({"messages": [{"role": U, "content": [{"type": "text", "text": 1}]}, ASSISTANT]}, "auto", "messages[0].content[0].text", "wrong_type"),
        ({"messages": [{"role": U, "content": ["a"]}, ASSISTANT]}, "auto", "messages[0].content[0]", "wrong_type"),
        # ShareGPT
        ({"conversations": None, "id": 1}, "sharegpt", "conversations", "missing_field"),
        ({"conversations": "x"}, "auto", "conversations", "wrong_type"),
        ({"conversations": []}, "auto", "conversations", "empty_conversation"),
        ({"conversations": [{"value": "x"}]}, "auto", "conversations[0].from", "missing_field"),
        ({"conversations": [{"from": "bing", "value": "x"}]}, "auto", "conversations[0].from", "unknown_role"),
        ({"conversations": [{"from": "human", "value": 1}]}, "auto", "conversations[0].value", "wrong_type"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "auto", "conversations[1].value", "empty_assistant"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "auto", "conversations", "no_assistant_turn"),
        ({"conversations": [{"from": "gpt", "value": "a"}], "system": 3}, "auto", "system", "wrong_type"),
        # no format at all
        ({"question": "q", "answer": "a"}, "auto", None, "unknown_format"),
        ({"messages": None, "prompt": None}, "auto", None, "unknown_format"),
        ({}, "auto", None, "unknown_format"),
    ],
)  # fmt: skip
def test_invalid_records(record, fmt, field, reason):
    assert rejected(record, fmt) == (field, reason)


def test_error_messages_say_what_was_expected():
    error = error_for({"messages": [{"role": U, "content": 5}, ASSISTANT]})
    assert error.message == "expected a string or a list of parts, got a number: 5"
    error = error_for({"messages": [USER, {"role": "bot", "content": "a"}]})
    assert error.message == "unknown role 'bot'; allowed: system, user, assistant, tool"
    error = error_for({"conversations": [{"from": "bing", "value": "x"}]})
    assert "'bing'" in error.message and "human, gpt" in error.message
    error = error_for({"prompt": "p", "response": "r"}, "alpaca")
    assert "looks like prompt-response format, not alpaca" in error.message
    error = error_for({"instruction": "i"})
    assert "alpaca rows need 'instruction' and 'output'" in error.message


def test_unknown_format_lists_the_keys_and_mentions_map():
    error = error_for({"question": "q", "answer": "a"})
    assert "'question', 'answer'" in error.message
    assert "'messages'" in error.message and "'instruction'" in error.message
    assert "--map" in error.message


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


def test_row_converter_locks_each_file_to_its_first_format():
    converter = RowConverter()
    alpaca = {"instruction": "i", "output": "o"}
    sharegpt = {"conversations": [{"from": "gpt", "value": "a"}]}
    with pytest.raises(RowError) as caught:
        converter.convert({"id": 1}, "a.jsonl", 1)  # matches nothing: no lock yet
    assert caught.value.reason == "unknown_format"
    converter.convert(alpaca, "a.jsonl", 2)
    converter.convert(sharegpt, "b.jsonl", 1)  # another file, another format
    with pytest.raises(RowError) as caught:
        converter.convert(sharegpt, "a.jsonl", 3)
    error = caught.value
    assert (error.source, error.row, error.field, error.reason) == (
        "a.jsonl",
        3,
        None,
        "mixed_formats",
    )
    assert "sharegpt" in error.message and "alpaca" in error.message
    assert "--format" in error.message and "Split" in error.message
    converter.convert(alpaca, "a.jsonl", 4)
    assert converter.file_formats == {"a.jsonl": "alpaca", "b.jsonl": "sharegpt"}


def test_row_converter_with_a_fixed_format_and_pickling():
    converter = RowConverter("prompt-response", {"prompt": "q", "response": "a"}, "Sys")
    clone = pickle.loads(pickle.dumps(converter))
    assert clone.convert({"q": "1", "a": "2"}, "f", 1) == [
        Message(S, "Sys"),
        Message(U, "1"),
        Message(A, "2"),
    ]
    with pytest.raises(RowError) as caught:
        clone.convert({"instruction": "i", "output": "o", "q": "1", "a": None}, "f", 2)
    assert (caught.value.field, caught.value.reason) == ("a", "missing_field")


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"fmt": "chatml"}, "unknown --format 'chatml'"),
        ({"column_map": {"question": "prompt"}}, "did you mean prompt=question"),
    ],
)
def test_row_converter_refuses_bad_settings(arguments, match):
    with pytest.raises(ConfigError, match=match):
        RowConverter(**arguments)


def test_formats_constant():
    assert FORMATS == ("alpaca", "prompt-response", "messages", "sharegpt")


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
    assert to_messages(record, "auto", "gsm8k.jsonl", 1, GSM8K_MAP) == [
        Message(U, "What is 2+2?"),
        Message(A, "2+2 = 4\n#### 4"),
    ]
    assert to_messages(record, "prompt-response", "gsm8k.jsonl", 1, GSM8K_MAP)[1].role == A


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
    assert to_messages(swapped, "auto", "f", 1, {"prompt": "response", "response": "prompt"}) == [
        Message(U, "the question"),
        Message(A, "the answer"),
    ]


def test_unknown_format_under_a_map_lists_the_input_columns():
    error = error_for({"q": None, "a": "x"}, column_map={"prompt": "q", "response": "a"})
    assert error.reason == "unknown_format"
    assert "['q', 'a']" in error.message


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
    assert to_messages(record, "auto", "f", 1, system_prompt="Be brief.") == [
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
    assert to_messages(record, "auto", "f", 1, system_prompt="Be brief.") == [
        Message(S, "Own."),
        Message(U, "p"),
        Message(A, "r"),
    ]


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_no_system_prompt(system_prompt):
    record = {"prompt": "p", "response": "r"}
    assert to_messages(record, "auto", "f", 1, system_prompt=system_prompt) == [
        Message(U, "p"),
        Message(A, "r"),
    ]


# --- files end to end --------------------------------------------------------------------------


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
    converter = RowConverter()
    kept, errors = [], []
    for item in iter_raw_rows(path):
        try:
            if isinstance(item, RowError):
                raise item
            kept.append((item.row, converter.convert(parse_payload(item), item.source, item.row)))
        except RowError as error:
            errors.append((error.row, error.field, error.reason))
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
    converter = RowConverter(column_map=parse_column_map("prompt=question,response=answer"))
    count = 0
    for item in iter_raw_rows(GSM8K_TRAIN):
        assert not isinstance(item, RowError), item
        messages = converter.convert(parse_payload(item), item.source, item.row)
        assert [message.role for message in messages] == [U, A]
        assert "####" in messages[1].content
        count += 1
    assert count == 7473
