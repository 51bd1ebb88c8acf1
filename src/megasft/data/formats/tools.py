"""Tool definitions and tool calls of a row, in the shapes chat templates take them
(docs/prepare.md, "Tools and tool calls").

Definitions: a `tools` list of function schemas, or a JSON string of one (glaive); a bare
schema `{name, parameters}` is wrapped as `{"type": "function", "function": ...}`. Calls:
OpenAI `tool_calls` (arguments an object or a JSON string) and ShareGPT `function_call` turns
(JSON `{name, arguments}`) become `{"type": "function", "function": {name, arguments}}` with
the arguments an object, which is what templates render with `tojson`.
"""

from __future__ import annotations

import json

from megasft.data.conversation import RowError
from megasft.data.formats.fields import wrong_type


def read_tools(record: dict, field: str, source: str, row: int) -> list[dict] | None:
    """The row's tool definitions, or None when the field is missing, null, "" or [].

    Args:
        record: the row, column-mapped.
        field: the field that holds them ("tools").
        source: the input file, for errors.
        row: the row number, for errors.

    Returns:
        A new list of OpenAI-style tool definitions, or None.

    Raises:
        RowError: "bad_tools" for a JSON string that does not parse, or definitions that are
            not a list of objects each naming a function.
    """
    value = record.get(field)
    if value is None or value == "" or value == []:
        return None
    if type(value) is str:
        value = _parsed(value, source, row, field, "bad_tools", "tool definitions")
        if value is None or value == []:
            return None
    if type(value) is dict:
        value = [value]
    if type(value) is not list:
        raise wrong_type(source, row, field, value, "a list of tool definitions or its JSON")
    tools = []
    for index, tool in enumerate(value):
        if type(tool) is not dict:
            raise wrong_type(source, row, f"{field}[{index}]", tool, "an object")
        function = tool.get("function") if "function" in tool else tool
        if type(function) is not dict or type(function.get("name")) is not str:
            raise RowError(
                source,
                row,
                f"{field}[{index}]",
                "bad_tools",
                "a tool definition must be a function schema with a 'name' (OpenAI "
                '{"type": "function", "function": {"name": ..., "parameters": ...}} or the '
                "bare function)",
            )
        tools.append(tool if "function" in tool else {"type": "function", "function": tool})
    return tools


def read_tool_calls(value: object, field: str, source: str, row: int) -> tuple[dict, ...]:
    """OpenAI `tool_calls`: a list of `{type, id, function: {name, arguments}}`.

    Raises:
        RowError: "bad_tool_call" for a call without a function name, or arguments that are
            neither an object nor a JSON string of one.
    """
    if type(value) is not list:
        raise wrong_type(source, row, field, value, "a list of tool calls")
    calls = []
    for index, call in enumerate(value):
        if type(call) is not dict:
            raise wrong_type(source, row, f"{field}[{index}]", call, "an object")
        function = call.get("function", call)
        calls.append(_call(function, f"{field}[{index}]", source, row, call.get("id")))
    return tuple(calls)


def call_from_text(text: str, field: str, source: str, row: int) -> dict:
    """A ShareGPT `function_call` turn's call: its value is JSON `{name, arguments}`.

    Raises:
        RowError: "bad_tool_call" when it does not parse or names no function.
    """
    return _call(
        _parsed(text, source, row, field, "bad_tool_call", "a tool call"), field, source, row
    )


def _call(function: object, field: str, source: str, row: int, call_id: object = None) -> dict:
    if type(function) is not dict or type(function.get("name")) is not str:
        raise RowError(
            source,
            row,
            field,
            "bad_tool_call",
            "a tool call must be an object with a function 'name' and its 'arguments'",
        )
    arguments = function.get("arguments", {})
    if type(arguments) is str:
        arguments = _parsed(arguments, source, row, f"{field}.arguments", "bad_tool_call", "")
        arguments = {} if arguments is None else arguments
    if type(arguments) is not dict:
        raise wrong_type(source, row, f"{field}.arguments", arguments, "an object or its JSON")
    call = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if type(call_id) is str:
        call["id"] = call_id
    return call


def _parsed(text: str, source: str, row: int, field: str, reason: str, what: str) -> object:
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError as error:
        raise RowError(
            source,
            row,
            field,
            reason,
            f"{what or 'the value'} is not valid JSON ({error.msg} at character {error.pos}): "
            f"{text[:60]!r}",
        ) from None
