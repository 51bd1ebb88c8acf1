"""The prompt/response format: prompt and response (or completion), optional system."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from megasft.data.formats import detect_format, input_formats
from tests.data.formats.conftest import A, S, U, convert, rejected


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
    assert convert(record, "prompt-response") == expected


@pytest.mark.parametrize(
    "record, field, reason",
    [
        ({"prompt": "p"}, "response", "missing_field"),
        ({"prompt": "p", "response": None, "completion": None}, "response", "missing_field"),
        ({"prompt": "p", "completion": 4}, "completion", "wrong_type"),
        ({"prompt": "p", "response": "  "}, "response", "empty_assistant"),
        ({"prompt": {"text": "p"}, "response": "r"}, "prompt", "wrong_type"),
    ],
)
def test_invalid_prompt_response_rows(record, field, reason):
    assert rejected(record) == (field, reason)


def test_with_answer_fills_the_response_column():
    prompt_response = input_formats()["prompt-response"]
    assert prompt_response.with_answer({"q": "p"}, "x", {"prompt": "q", "response": "a"}) == {
        "q": "p",
        "a": "x",
    }
    assert prompt_response.with_answer({"prompt": "p"}, "x", {}) == {
        "prompt": "p",
        "response": "x",
    }
