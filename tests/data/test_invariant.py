"""The invariant masking rests on, for every template style in the tests: the inference
rendering (history, tools, add_generation_prompt) is a prefix of the training rendering, and
the trained tokens are exactly what follows it, up to and including the end-of-turn token."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from megasft.data.split_turns import split_turns
from tests.data.conftest import make_masker, trained_segments
from tests.data.styles import STYLES, TOOL_STYLES

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
LOOKUP = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x y"}}}

PLAIN = [
    Message("system", "Be brief."),
    Message("user", "What is 2 + 2?"),
    Message("assistant", "It is 4."),
    Message("user", "And 3 + 3?"),
    Message("assistant", "6"),
]
WITH_CALL = [
    Message("user", "Look x y up."),
    Message("assistant", "", True, (LOOKUP,)),
    Message("tool", "found"),
    Message("assistant", "Found it."),
    Message("user", "Thanks"),
    Message("assistant", "You are welcome."),
]


def cases(style: str) -> list[tuple[list[Message], list[dict] | None, dict]]:
    """(messages, tools, policy) to check for a style."""
    found = [(PLAIN, None, {}), (PLAIN, None, {"loss_on": "last-assistant"})]
    if style == "reasoning":
        # Prefix-unstable for earlier turns when they reason: only the last turn here.
        thinking = [
            *PLAIN[:2],
            Message("assistant", "<think>\nadd\n</think>\nIt is 4."),
            *PLAIN[3:],
        ]
        found.append((thinking, None, {"loss_on": "last-assistant"}))
    if style in TOOL_STYLES:
        found.append((WITH_CALL, TOOLS, {}))
    return found


def expected_segments(chat, messages, tools, policy, end_of_turn: str) -> list[str]:
    """What follows each trained turn's inference rendering, through its end-of-turn token."""
    template = chat.template
    full = template.render(messages, False, tools)
    turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if policy.get("loss_on") == "last-assistant":
        turns = turns[-1:]
    segments = []
    for i in turns:
        prompt = template.render(messages[:i], True, tools)
        assert full.startswith(prompt), (i, prompt, full)
        end = full.index(end_of_turn, len(prompt)) + len(end_of_turn)
        segments.append(full[len(prompt) : end])
    return segments


@pytest.mark.parametrize("style", sorted(STYLES))
def test_trained_tokens_are_what_follows_the_inference_rendering(chat_tokenizers, style):
    chat = chat_tokenizers[style]
    for messages, tools, policy in cases(style):
        example = make_masker(chat, **policy).mask(messages, tools=tools)
        expected = expected_segments(chat, messages, tools, policy, STYLES[style].end_of_turn)
        assert trained_segments(example, chat.tokenizer) == expected, (messages, policy)


THINKING = [
    Message("user", "What is 2 + 2?"),
    Message("assistant", "<think>\nadd\n</think>\n\nIt is 4."),
    Message("user", "And 3 + 3?"),
    Message("assistant", "6", reasoning_content="add again"),
]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_split_part_holds_the_invariant(chat_tokenizers, style):
    chat = chat_tokenizers[style]
    masker = make_masker(chat)
    messages = THINKING if style in ("reasoning", "qwen3") else PLAIN
    for part in split_turns(messages, masker.turns.trained_turns(messages)):
        example = masker.mask(part)
        expected = expected_segments(chat, part, None, {}, STYLES[style].end_of_turn)
        assert trained_segments(example, chat.tokenizer) == expected[-1:], part
