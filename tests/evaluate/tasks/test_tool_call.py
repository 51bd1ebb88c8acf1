"""`--task tool-call`: calls found as templates write them, names exact, arguments compared
as parsed JSON, format accuracy for a call that parses; references from tool_calls rows."""

from __future__ import annotations

import json
import re

import pytest

from megasft.evaluate.prompts import read_task_prompts
from megasft.evaluate.tasks import get_task

TOOL_CALL = get_task("tool-call")
ANY = re.compile(TOOL_CALL.default_format_pattern)
PARIS = json.dumps([["get_weather", {"city": "Paris", "days": 2}]], sort_keys=True)


@pytest.mark.parametrize(
    ("response", "method"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>', "tool_call_tag"),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}]</s>', "tool_calls_token"),
        ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', "json"),
        ('Sure: {"name":"get_weather","arguments":"{\\"days\\": 2, \\"city\\": \\"Paris\\"}"}', "json"),
    ],
)  # fmt: skip
def test_calls_are_found_in_each_templates_syntax_and_compared_as_json(response, method):
    score = TOOL_CALL.score(response, PARIS, ANY)
    assert (score.answer, score.method, score.correct, score.format_ok) == (
        PARIS,
        method,
        True,
        True,
    )


@pytest.mark.parametrize(
    ("response", "correct", "format_ok"),
    [
        ('{"name": "get_forecast", "arguments": {"city": "Paris", "days": 2}}', False, True),
        ('{"name": "get_weather", "arguments": {"city": "paris", "days": 2}}', False, True),
        ('{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}', False, True),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>', False, False),
        ("It is sunny in Paris.", False, False),
        ("", False, False),
    ],
)  # fmt: skip
def test_wrong_name_or_arguments_and_unparsable_calls(response, correct, format_ok):
    score = TOOL_CALL.score(response, PARIS, ANY)
    assert (score.correct, score.format_ok) == (correct, format_ok)


def test_several_calls_must_all_match_in_order():
    two = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    )
    expected = TOOL_CALL.reference_answer(
        '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\\"x\\": 1}"}]'
    )
    assert TOOL_CALL.score(two, expected, ANY).correct
    assert not TOOL_CALL.score(two.split("</tool_call>")[0] + "</tool_call>", expected, ANY).correct


def test_references_come_from_the_final_tool_calls_and_prompts_carry_the_tools(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris for 2 days?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}],
            },
        ],
        "tools": tools,
    }  # fmt: skip
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    prompts = read_task_prompts(TOOL_CALL, str(path))
    assert prompts.expected == [PARIS]
    assert prompts.examples[0].tools == tools
