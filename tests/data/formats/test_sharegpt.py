"""The ShareGPT format: a list of {from, value}, optional top-level system."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from megasft.data.formats import detect_format, input_formats
from megasft.data.formats.sharegpt import SHAREGPT_ROLES
from tests.data.formats.conftest import A, S, T, U, convert, error_for, rejected


@pytest.mark.parametrize("source_role, role", sorted(SHAREGPT_ROLES.items()))
def test_sharegpt_role_mapping(source_role, role):
    if source_role == "function_call":
        pytest.skip("a function_call turn holds a JSON call: test_tools.py")
    turns = [{"from": source_role, "value": "x"}]
    if role != A:
        turns.append({"from": "gpt", "value": "y"})
    assert convert({"conversations": turns}, "sharegpt")[0] == Message(role, "x")


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
    assert convert(record, "sharegpt") == [
        Message(S, "Be kind."),
        Message(U, "Hi"),
        Message(A, "Hello"),
    ]


@pytest.mark.parametrize(
    "record, fmt, field, reason",
    [
        ({"conversations": None, "id": 1}, "sharegpt", "conversations", "missing_field"),
        ({"conversations": "x"}, "auto", "conversations", "wrong_type"),
        ({"conversations": []}, "auto", "conversations", "empty_conversation"),
        ({"conversations": [{"value": "x"}]}, "auto", "conversations[0].from", "missing_field"),
        ({"conversations": [{"from": "bing", "value": "x"}]}, "auto", "conversations[0].from", "unknown_role"),
        ({"conversations": [{"from": "human", "value": 1}]}, "auto", "conversations[0].value", "wrong_type"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "auto", "conversations[1].value", "empty_assistant"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "auto", "conversations", "no_assistant_turn"),
        ({"conversations": [{"from": "gpt", "value": "a"}], "system": 3}, "auto", "system", "wrong_type"),
    ],
)  # fmt: skip
def test_invalid_sharegpt_rows(record, fmt, field, reason):
    assert rejected(record, fmt) == (field, reason)


def test_an_unknown_role_lists_the_sharegpt_roles():
    error = error_for({"conversations": [{"from": "bing", "value": "x"}]})
    assert "'bing'" in error.message and "human, gpt" in error.message


def test_with_answer_appends_a_gpt_turn():
    sharegpt = input_formats()["sharegpt"]
    human = {"from": "human", "value": "q"}
    assert sharegpt.with_answer({"conversations": [human]}, "x", {}) == {
        "conversations": [human, {"from": "gpt", "value": "x"}]
    }
    assert sharegpt.with_answer({"conversations": None}, "x", {}) is None
