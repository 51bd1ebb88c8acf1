"""ShareGPT rows: `conversations: [{from, value}, ...]`, optional `system` (docs/prepare.md).

`from` is mapped by SHAREGPT_ROLES; a top-level `system` string becomes a leading system
message, before any system turns of the conversation itself (which are kept). A `tools`
column and `function_call` / `observation` turns are tool definitions, calls and responses.
"""

from __future__ import annotations

from megasft.data.conversation import Conversation
from megasft.data.formats.fields import top_level_system
from megasft.data.formats.registry import ColumnMap, InputFormat, register_format
from megasft.data.formats.tools import read_tools
from megasft.data.formats.turns import read_turns, with_turn

SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
"""ShareGPT `from` value -> role."""

_CALL_ROLES = frozenset({"function_call"})
"""`from` values whose value is a JSON tool call (glaive / LLaMA-Factory)."""


@register_format
class ShareGPT(InputFormat):
    name = "sharegpt"
    detection_key = "conversations"
    detection_rank = 20
    fields = ("conversations", "system", "tools")
    needs = "'conversations', a list of {from, value} (optional 'system')"
    shape = "'conversations' (ShareGPT)"

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        turns = read_turns(
            record, "conversations", "from", "value", SHAREGPT_ROLES, source, row, _CALL_ROLES
        )
        messages = top_level_system(record, source, row) + turns
        if record.get("tools") is None:
            return Conversation(self.name, messages)
        return Conversation(self.name, messages, read_tools(record, "tools", source, row))

    def with_answer(self, record: dict, answer: str, column_map: ColumnMap) -> dict | None:
        turn = {"from": "gpt", "value": answer}
        return with_turn(record, column_map.get("conversations", "conversations"), turn)
