"""preview.html's panel for rows with tools: the tool definitions, each assistant's calls and
each tool response, shown apart from one another and marked as trained or not (definitions
and responses never are), above the example's tokens (docs/prepare.md, "preview.html")."""

from __future__ import annotations

import html
import json

from megasft.data.conversation import Conversation

TOOLS_STYLE = """
.conversation { border: 1px solid #ccc; padding: 0.5em 0.8em; margin-bottom: 0.5em; }
.conversation pre { margin: 0.2em 0; white-space: pre-wrap; font-size: 90%; }
.tool-definitions { background: #eef3fb; }
.tool-call { background: #c8f0c8; }
.tool-response { background: #fbf3e4; }
.label { font-size: 85%; color: #555; }
"""


def has_tool_parts(conversation: Conversation | None) -> bool:
    """Whether the conversation has tool definitions, calls or responses to show."""
    if conversation is None:
        return False
    return conversation.tools is not None or any(
        m.tool_calls is not None or m.role == "tool" for m in conversation.messages
    )


def conversation_panel(conversation: Conversation) -> str:
    """The HTML of the panel; "" for a conversation without tool parts.

    Args:
        conversation: the row as its input format read it.

    Returns:
        A `<div class="conversation">` with one block per tool part.
    """
    if not has_tool_parts(conversation):
        return ""
    blocks = []
    if conversation.tools is not None:
        names = ", ".join(str(tool["function"].get("name")) for tool in conversation.tools)
        blocks.append(
            _block(
                "tool-definitions", f"tool definitions ({names}), not trained", conversation.tools
            )
        )
    for index, message in enumerate(conversation.messages):
        if message.tool_calls is not None:
            calls = [call["function"] for call in message.tool_calls]
            trained = "trained" if message.train else "not trained"
            blocks.append(_block("tool-call", f"message {index}: tool calls, {trained}", calls))
        elif message.role == "tool":
            label = f"message {index}: tool response, not trained"
            blocks.append(_block("tool-response", label, message.content))
    return f'<div class="conversation">{"".join(blocks)}</div>'


def _block(kind: str, label: str, value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1)
    return (
        f'<div class="{kind}"><span class="label">{html.escape(label)}</span>'
        f"<pre>{html.escape(text)}</pre></div>"
    )
