"""Tool definitions and tool calls, in the messages and ShareGPT (glaive) layouts."""

from __future__ import annotations

import json

from megasft.data.conversation import Message
from megasft.data.formats import RowConverter
from tests.data.formats.conftest import A, T, U, rejected

WEATHER = {"name": "get_weather", "parameters": {"type": "object"}}
TOOL = {"type": "function", "function": WEATHER}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def read(record: dict, **options):
    return RowConverter("auto", **options).convert(record, "in.jsonl", 1)


def test_openai_tool_calls_become_structured_calls_with_object_arguments():
    record = {
        "messages": [
            {"role": U, "content": "Weather?"},
            {
                "role": A,
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}},
                ],
            },
            {"role": T, "content": "21", "tool_call_id": "c1"},
            {"role": A, "content": "Warm."},
        ],
        "tools": [TOOL],
    }  # fmt: skip
    conversation = read(record)
    first = {**call("get_weather", city="Paris"), "id": "c1"}
    assert conversation.messages == [
        Message(U, "Weather?"),
        Message(A, "", True, (first, call("get_weather", city="Lyon"))),
        Message(T, "21"),
        Message(A, "Warm."),
    ]
    assert conversation.tools == [TOOL]


def test_rows_without_tools_have_none():
    record = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]}
    assert read(record).tools is None
    assert read({**record, "tools": []}).tools is None


def test_glaive_tools_string_and_function_call_turns():
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris and Lyon?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": '{"city": "Lyon"}'})},
            {"from": "observation", "value": "21"},
            {"from": "observation", "value": "25"},
            {"from": "gpt", "value": "21 and 25."},
        ],
        "tools": json.dumps([WEATHER]),
    }  # fmt: skip
    conversation = read(record)
    calls = (call("get_weather", city="Paris"), call("get_weather", city="Lyon"))
    assert conversation.messages == [
        Message(U, "Weather in Paris and Lyon?"),
        Message(A, "", True, calls),
        Message(T, "21"),
        Message(T, "25"),
        Message(A, "21 and 25."),
    ]
    assert conversation.tools == [TOOL]


def test_a_call_after_an_answer_joins_that_assistant_message():
    record = {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "Let me look."},
            {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert read(record).messages[1] == Message(A, "Let me look.", True, (call("f"),))


def test_tools_field_can_be_mapped_from_another_column():
    record = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        "functions": [WEATHER],
    }
    assert read(record, column_map={"tools": "functions"}).tools == [TOOL]


def test_bad_function_call_turns_are_rejected_with_their_field():
    turns = [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{oops"}]
    assert rejected({"conversations": turns}) == ("conversations[1].value", "bad_tool_call")
    turns[1]["value"] = '{"arguments": {}}'
    assert rejected({"conversations": turns}) == ("conversations[1].value", "bad_tool_call")


def test_bad_tools_are_rejected_naming_the_mapped_column():
    record = {"conversations": [{"from": "gpt", "value": "a"}], "functions": "not json"}
    assert rejected(record, column_map={"tools": "functions"}) == ("functions", "bad_tools")
