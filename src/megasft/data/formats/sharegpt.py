"""ShareGPT rows: `conversations: [{from, value}, ...]`, optional `system` (docs/prepare.md).

`from` is mapped by SHAREGPT_ROLES; a top-level `system` string becomes a leading system
message, before any system turns of the conversation itself (which are kept).
"""

from __future__ import annotations

from megasft.data.conversation import Conversation
from megasft.data.formats.fields import top_level_system
from megasft.data.formats.registry import ColumnMap, InputFormat, register_format
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


@register_format
class ShareGPT(InputFormat):
    name = "sharegpt"
    detection_key = "conversations"
    detection_rank = 20
    fields = ("conversations", "system")
    needs = "'conversations', a list of {from, value} (optional 'system')"
    shape = "'conversations' (ShareGPT)"

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        turns = read_turns(record, "conversations", "from", "value", SHAREGPT_ROLES, source, row)
        return Conversation(self.name, top_level_system(record, source, row) + turns)

    def with_answer(self, record: dict, answer: str, column_map: ColumnMap) -> dict | None:
        turn = {"from": "gpt", "value": answer}
        return with_turn(record, column_map.get("conversations", "conversations"), turn)
