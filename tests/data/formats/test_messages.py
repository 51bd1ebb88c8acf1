"""The OpenAI messages format: a list of {role, content}, content as text or text parts."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from megasft.data.formats import detect_format, input_formats
from tests.data.formats.conftest import A, S, T, U, convert, error_for, rejected

USER = {"role": U, "content": "q"}
ASSISTANT = {"role": A, "content": "a"}


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
    assert convert(record, "messages") == [
        Message(S, "  You help.\n"),
        Message(U, "Weather?\r\n"),
        Message(A, "Let me look."),
        Message(T, '{"temp": 3}'),
        Message(A, " Cold. "),
    ]


def test_openai_list_of_text_parts_is_joined_without_separator():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world", "extra": 1}]
    record = {"messages": [{"role": U, "content": parts}, {"role": A, "content": parts}]}
    assert convert(record, "messages") == [Message(U, "Hello world"), Message(A, "Hello world")]


def test_an_empty_list_of_parts_is_empty_content():
    record = {"messages": [{"role": U, "content": []}, {"role": A, "content": "a"}]}
    assert convert(record, "messages")[0] == Message(U, "")
    record = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": []}]}
    assert rejected(record) == ("messages[1].content", "empty_assistant")


def test_a_conversation_may_start_with_the_assistant():
    record = {"messages": [{"role": A, "content": "Hi!"}, {"role": U, "content": "Hey"}]}
    assert convert(record, "messages") == [Message(A, "Hi!"), Message(U, "Hey")]


@pytest.mark.parametrize(
    "record, fmt, field, reason",
    [
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
        ({"messages": [USER, {"role": A, "content": None, "tool_calls": [{"id": "c1"}]}]}, "auto", "messages[1].tool_calls[0]", "bad_tool_call"),
        ({"messages": [USER, {"role": A, "content": None, "tool_calls": {"id": "c1"}}]}, "auto", "messages[1].tool_calls", "wrong_type"),
        ({"messages": [USER, {"role": A, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]}, "auto", "messages[1].tool_calls[0].arguments", "bad_tool_call"),
        ({"messages": [USER, {"role": A, "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]}, "auto", "messages[1].tool_calls[0].arguments", "wrong_type"),
        ({"messages": [USER, ASSISTANT], "tools": "[{"}, "auto", "tools", "bad_tools"),
        ({"messages": [USER, ASSISTANT], "tools": [{"type": "function"}]}, "auto", "tools[0]", "bad_tools"),
        ({"messages": [USER, ASSISTANT], "tools": ["f"]}, "auto", "tools[0]", "wrong_type"),
        ({"messages": [USER, ASSISTANT], "tools": 3}, "auto", "tools", "wrong_type"),
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
    ],
)  # fmt: skip
def test_invalid_messages_rows(record, fmt, field, reason):
    assert rejected(record, fmt) == (field, reason)


def test_error_messages_say_what_was_expected():
    error = error_for({"messages": [{"role": U, "content": 5}, ASSISTANT]})
    assert error.message == "expected a string or a list of parts, got a number: 5"
    error = error_for({"messages": [USER, {"role": "bot", "content": "a"}]})
    assert error.message == "unknown role 'bot'; allowed: system, user, assistant, tool"


def test_with_answer_appends_an_assistant_message():
    messages = input_formats()["messages"]
    record = {"dialog": [USER], "id": 3}
    assert messages.with_answer(record, "x", {"messages": "dialog"}) == {
        "dialog": [USER, {"role": A, "content": "x"}],
        "id": 3,
    }
    assert record == {"dialog": [USER], "id": 3}  # a copy
    assert messages.with_answer({"messages": "no list"}, "x", {}) is None
