"""`--task tool-call`: the model's tool calls against the reference's.

Calls are found in the text as templates write them: `<tool_call>{...}</tool_call>` blocks
(Qwen2.5, Qwen3), a `[TOOL_CALLS]` list (Mistral), else the first JSON object or list in the
text (Llama 3.1's bare `{"name", "parameters"}`). A call is correct when every call's function
name is the same and its arguments are equal as parsed JSON (key order and spacing do not
matter); format accuracy counts responses holding a call that parses. docs/evaluate.md.
"""

from __future__ import annotations

import json
import re

from megasft.evaluate.tasks import register_task
from megasft.evaluate.tasks.base import Extraction, Score, Task

TOOL_CALL_TAG = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_DECODER = json.JSONDecoder()


@register_task
class ToolCall(Task):
    name = "tool-call"
    extraction_methods = ("tool_call_tag", "tool_calls_token", "json", "none")
    # Any response; format accuracy is whether a call parses (see `score`).
    default_format_pattern = r"[\s\S]"
    reference_hint = (
        "a tool-call reference must be an assistant turn with tool_calls, or hold a JSON call "
        '{"name": ..., "arguments": {...}}'
    )

    def reference_answer(self, reference: str) -> str | None:
        return self.extract(reference).answer

    def extract(self, response: str) -> Extraction:
        """The calls, as canonical JSON of a list of `[name, arguments]` pairs."""
        tags = TOOL_CALL_TAG.findall(response)
        if tags:
            calls = [_first_json(tag) for tag in tags]
            return _extraction(calls if None not in calls else None, "tool_call_tag")
        at = response.find("[TOOL_CALLS]")
        if at >= 0:
            return _extraction(
                _first_json(response[at + len("[TOOL_CALLS]") :]), "tool_calls_token"
            )
        return _extraction(_first_json(response), "json")

    def score(self, response: str, expected: str | None, format_pattern: re.Pattern) -> Score:
        """Correct when the calls equal the reference's; well-formed when a call parses (and
        the response matches `format_pattern`)."""
        extraction = self.extract(response)
        correct = extraction.answer is not None and extraction.answer == expected
        format_ok = extraction.answer is not None and format_pattern.search(response) is not None
        return Score(extraction.answer, extraction.method, correct, format_ok)


def _first_json(text: str) -> object | None:
    """The first JSON object or list in `text`, or None."""
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = _DECODER.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        return value
    return None


def _extraction(value: object, method: str) -> Extraction:
    calls = _calls(value)
    if calls is None:
        return Extraction(None, "none")
    return Extraction(json.dumps(calls, sort_keys=True, ensure_ascii=False), method)


def _calls(value: object) -> list | None:
    """[[name, arguments], ...] of a call, a list of calls or an OpenAI `tool_calls` list;
    None when it is not one."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if isinstance(item, list) and len(item) == 1:
            item = item[0]  # a <tool_call> block holding a one-call list
        if not isinstance(item, dict):
            return None
        function = item.get("function", item)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return None
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return None
        calls.append([function["name"], arguments])
    return calls or None
