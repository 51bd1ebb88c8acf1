"""The Alpaca format: instruction (+ input) and output, optional system."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from megasft.data.formats import detect_format, input_formats
from tests.data.formats.conftest import A, S, U, convert, error_for, rejected


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
    assert convert(record, "alpaca") == expected


@pytest.mark.parametrize(
    "record, fmt, field, reason",
    [
        ({"instruction": "i"}, "auto", "output", "missing_field"),
        ({"instruction": "i", "output": None}, "auto", "output", "missing_field"),
        ({"instruction": 3, "output": "o"}, "auto", "instruction", "wrong_type"),
        ({"instruction": "i", "output": ["o"]}, "auto", "output", "wrong_type"),
        ({"instruction": "i", "input": 1, "output": "o"}, "auto", "input", "wrong_type"),
        ({"instruction": "i", "output": "o", "system": 1}, "auto", "system", "wrong_type"),
        ({"instruction": "i", "output": ""}, "auto", "output", "empty_assistant"),
        ({"instruction": "i", "output": " \n\t"}, "auto", "output", "empty_assistant"),
        ({"output": "o"}, "alpaca", "instruction", "missing_field"),
    ],
)
def test_invalid_alpaca_rows(record, fmt, field, reason):
    assert rejected(record, fmt) == (field, reason)


def test_a_missing_field_says_what_alpaca_rows_need():
    error = error_for({"instruction": "i"})
    assert "alpaca rows need 'instruction' and 'output'" in error.message


def test_with_answer_fills_the_output_column():
    alpaca = input_formats()["alpaca"]
    record = {"instruction": "i", "out": None}
    assert alpaca.with_answer(record, "x", {"output": "out"}) == {"instruction": "i", "out": "x"}
    assert alpaca.with_answer({"instruction": "i"}, "x", {}) == {"instruction": "i", "output": "x"}
    assert record == {"instruction": "i", "out": None}  # a copy
