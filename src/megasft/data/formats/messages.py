"""OpenAI messages rows: `messages: [{role, content}, ...]` (docs/prepare.md).

Roles are exactly `conversation.ROLES`; content is a string or a list of text parts
`{"type": "text", "text": ...}`, joined with "". Assistant `tool_calls` and a row's `tools`
are read by tools.py.
"""

from __future__ import annotations

from megasft.data.conversation import ROLES, Conversation
from megasft.data.formats.registry import ColumnMap, InputFormat, register_format
from megasft.data.formats.tools import read_tools
from megasft.data.formats.turns import read_turns, with_turn

_ROLES = {role: role for role in ROLES}


@register_format
class OpenAIMessages(InputFormat):
    name = "messages"
    detection_key = "messages"
    detection_rank = 10
    fields = ("messages", "tools")
    needs = "'messages', a list of {role, content}"
    shape = "'messages' (OpenAI)"

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        messages = read_turns(record, "messages", "role", "content", _ROLES, source, row)
        if record.get("tools") is None:
            return Conversation(self.name, messages)
        return Conversation(self.name, messages, read_tools(record, "tools", source, row))

    def with_answer(self, record: dict, answer: str, column_map: ColumnMap) -> dict | None:
        turn = {"role": "assistant", "content": answer}
        return with_turn(record, column_map.get("messages", "messages"), turn)
