"""Prompt/response rows: `prompt` and `response` (or `completion`), optional `system`
(docs/prepare.md)."""

from __future__ import annotations

from megasft.data.conversation import Conversation, Message, RowError
from megasft.data.formats.fields import empty_assistant, required_text, top_level_system
from megasft.data.formats.registry import ColumnMap, InputFormat, register_format


@register_format
class PromptResponse(InputFormat):
    """The prompt is the user message; the answer is `response`, or `completion` where the row
    has no `response`."""

    name = "prompt-response"
    detection_key = "prompt"
    detection_rank = 40
    fields = ("prompt", "response", "completion", "system")
    needs = "'prompt' and 'response' or 'completion' (optional 'system')"
    shape = "'prompt' + 'response'/'completion'"

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        prompt = required_text(record, "prompt", source, row)
        response_field = "response" if record.get("response") is not None else "completion"
        if record.get(response_field) is None:
            raise RowError(
                source,
                row,
                "response",
                "missing_field",
                "a prompt-response row needs 'response' (or 'completion'), and it is missing "
                "or null",
            )
        response = required_text(record, response_field, source, row)
        if not response or response.isspace():
            raise empty_assistant(source, row, response_field)
        messages = top_level_system(record, source, row)
        messages.append(Message("user", prompt))
        messages.append(Message("assistant", response))
        return Conversation(self.name, messages)

    def with_answer(self, record: dict, answer: str, column_map: ColumnMap) -> dict:
        return {**record, column_map.get("response", "response"): answer}
