"""`--multi-turn split`: one example per trained assistant turn, each the conversation up to
that turn, so each is rendered exactly as the template renders that turn at inference (history
as the template shows it, earlier reasoning dropped where the template drops it). Templates
that are not prefix-stable (Qwen3's reasoning) get every turn trained. docs/prepare.md,
"Reasoning and --multi-turn split".
"""

from __future__ import annotations

from dataclasses import replace

from megasft.data.conversation import Message

MULTI_TURN_CHOICES = ("whole", "split")


def split_turns(messages: list[Message], turns: list[int]) -> list[list[Message]]:
    """The conversations that train one turn each.

    Args:
        messages: the whole conversation.
        turns: the indices of its trained assistant messages, in order.

    Returns:
        For each turn i, messages[: i + 1] with the earlier assistant messages untrained.
    """
    parts = []
    for turn in turns:
        history = [
            replace(message, train=False)
            if message.role == "assistant" and message.train
            else message
            for message in messages[:turn]
        ]
        parts.append([*history, messages[turn]])
    return parts
