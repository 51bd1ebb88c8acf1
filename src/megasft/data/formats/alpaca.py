"""Alpaca rows: `instruction`, `output`, optional `input` and `system` (docs/prepare.md)."""

from __future__ import annotations

from megasft.data.conversation import Conversation, Message
from megasft.data.formats.fields import (
    empty_assistant,
    optional_text,
    required_text,
    top_level_system,
)
from megasft.data.formats.registry import ColumnMap, InputFormat, register_format


@register_format
class Alpaca(InputFormat):
    """The user message is the instruction, then a blank line and the input when the input is
    not ""; the answer is the output."""

    name = "alpaca"
    detection_key = "instruction"
    detection_rank = 30
    fields = ("instruction", "input", "output", "system")
    needs = "'instruction' and 'output' (optional 'input', 'system')"
    shape = "'instruction' + 'output' (Alpaca)"

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        instruction = required_text(record, "instruction", source, row)
        output = required_text(record, "output", source, row)
        extra_input = optional_text(record, "input", source, row)
        if not output or output.isspace():
            raise empty_assistant(source, row, "output")
        messages = top_level_system(record, source, row)
        messages.append(
            Message("user", instruction + "\n\n" + extra_input if extra_input else instruction)
        )
        messages.append(Message("assistant", output))
        return Conversation(self.name, messages)

    def with_answer(self, record: dict, answer: str, column_map: ColumnMap) -> dict:
        return {**record, column_map.get("output", "output"): answer}
