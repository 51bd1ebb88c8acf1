"""Where the trained turns of a conversation lie in its rendering, in characters.

A turn's trained text is what follows `render(messages[:i], add_generation_prompt=True)` up to
the end of `render(messages[:i + 1])`, less the whitespace after its end-of-turn token. The
fast path finds those positions in a "skeleton", the template rendered once per sequence of
roles with placeholder contents; the prefix renders are the fallback. docs/prepare.md, "How
masks are made", gives the reasons.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

from megasft.data.conversation import Message
from megasft.data.mask_types import MaskingError, MaskPolicy, TemplateLayoutError
from megasft.data.template import TemplateError
from megasft.data.tokenizer import ChatTokenizer
from megasft.data.tool_support import ToolSupport

_UNBUILT = object()
"""A sequence of roles whose skeleton has not been built yet (None: none can be)."""


@dataclass(frozen=True, slots=True)
class _Skeleton:
    """The rendering of one sequence of roles with placeholder contents."""

    pieces: tuple[str, ...]
    """Template text between contents: pieces[0] + content[order[0]] + pieces[1] + ..."""
    order: tuple[int, ...]
    """Message index of each content slot, in text order."""
    placeholder_lengths: tuple[int, ...]
    """Length of the placeholder in each slot, in text order."""
    turns: dict[int, tuple[bool, int, int, int, int]]
    """Assistant index -> (ends_in_special, start, slots_before_start, end, slots_before_end),
    positions in the skeleton, each with the number of content slots before it (a real
    position is the skeleton one plus the growth of those slots). With ends_in_special,
    [start, end) is the trained span; else it is (generation prompt end, turn end), and where
    the span ends depends on the real content's trailing whitespace, worked out on the real
    text."""


def _placeholder(index: int) -> str:
    # Private-use code points: never in real text, untouched by `trim` and friends.
    return f"\ue000{index}\ue001"


class TurnSpans:
    """Finds the trained character spans of rendered conversations, for one tokenizer's template
    and one policy. Holds a per-process cache of skeletons keyed by the sequence of roles."""

    def __init__(self, chat_tokenizer: ChatTokenizer, policy: MaskPolicy):
        self.chat_tokenizer = chat_tokenizer
        self.template = chat_tokenizer.template
        self.policy = policy
        # Longest first, so that "</s>" is not matched inside a longer special token's text.
        self._special_texts = tuple(
            sorted(chat_tokenizer.special_token_texts, key=len, reverse=True)
        )
        self._skeletons: dict[tuple[str, ...], _Skeleton | None] = {}
        self.tool_support = ToolSupport(chat_tokenizer)

    def render(
        self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None = None
    ) -> str:
        """The template's rendering; raises MaskingError "template_error" when it refuses.

        Raises:
            TemplateLayoutError: for tools or tool calls given to a template that drops them.
        """
        if tools is not None or any(m.tool_calls is not None for m in messages):
            self.tool_support.check(tools is not None, any(m.tool_calls for m in messages))
        try:
            return self.template.render(messages, add_generation_prompt, tools)
        except TemplateError as error:
            raise MaskingError("template_error", f"the chat template refused it: {error}") from None

    def trained_turns(self, messages: list[Message]) -> list[int]:
        """The indices of the assistant messages the policy trains."""
        assistants = [i for i, m in enumerate(messages) if m.role == "assistant"]
        if self.policy.loss_on == "last-assistant":
            assistants = assistants[-1:]
        return [i for i in assistants if messages[i].train]

    def char_spans(
        self, messages: list[Message], text: str, tools: list[dict] | None = None
    ) -> list[tuple[int, int]]:
        """The trained character spans of `text`, the full rendering of `messages` (with
        `tools`). Rows with tools, tool calls or reasoning_content always take the prefix
        renders: the template writes those out itself, so no skeleton of contents stands for
        them."""
        turns = self.trained_turns(messages)
        if not turns:
            return []
        plain = all(m.tool_calls is None and m.reasoning_content is None for m in messages)
        if tools is None and plain:
            spans = self._spans_from_skeleton(messages, text, turns)
            if spans is not None:
                return spans
        bounds = self._bounds_from_prefixes(messages, text, turns, tools)
        return [self._trained_span(text, gen_end, turn_end) for gen_end, turn_end in bounds]

    def _trained_span(self, text: str, gen_end: int, turn_end: int) -> tuple[int, int]:
        """[start, end) of the answer plus, by policy, its end-of-turn token."""
        span = self._span_if_special_end(text, gen_end, turn_end)
        if span is not None:
            return span
        return (gen_end, gen_end + len(text[gen_end:turn_end].rstrip()))

    def _span_if_special_end(
        self, text: str, gen_end: int, turn_end: int
    ) -> tuple[int, int] | None:
        """The trained span when the turn ends in a special token (after whitespace), else None."""
        stripped = text[gen_end:turn_end].rstrip()
        end = gen_end + len(stripped)
        for special in self._special_texts:
            if stripped.endswith(special):
                return (gen_end, end if self.policy.train_on_eos else end - len(special))
        return None

    def _bounds_from_prefixes(
        self,
        messages: list[Message],
        text: str,
        turns: list[int],
        tools: list[dict] | None = None,
    ) -> list[tuple[int, int]]:
        bounds = []
        for i in turns:
            prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            through = self.render(messages[: i + 1], add_generation_prompt=False, tools=tools)
            if not (text.startswith(prompt) and text.startswith(through)) or len(through) < len(
                prompt
            ):
                raise MaskingError(
                    "template_not_prefix_stable",
                    f"the chat template renders the conversation up to message {i} differently "
                    "from how the full conversation shows it (templates that drop reasoning "
                    f"from earlier turns do this), so turn {i} cannot be masked exactly; train "
                    "only the final answer with --loss-on last-assistant, or split the "
                    "conversation into one row per answer",
                )
            self._check_no_header(messages[i], text[len(prompt) : len(through)])
            bounds.append((len(prompt), len(through)))
        return bounds

    def _check_no_header(self, message: Message, output: str) -> None:
        at = output.find(message.content) if message.content else -1
        if at > 0 and any(special in output[:at] for special in self._special_texts):
            raise TemplateLayoutError(
                f"the chat template of {self.chat_tokenizer.path} emits the assistant header "
                f"inside the turn ({output[:at]!r}) instead of in its generation prompt, so the "
                "header cannot be told apart from the answer; use a template that supports "
                "add_generation_prompt"
            )

    def _spans_from_skeleton(
        self, messages: list[Message], text: str, turns: list[int]
    ) -> list[tuple[int, int]] | None:
        roles = tuple([m.role for m in messages])
        skeleton = self._skeletons.get(roles, _UNBUILT)
        if skeleton is _UNBUILT:
            skeleton = self._skeletons[roles] = self._build_skeleton(messages)
        if skeleton is None:
            return None
        # Put the real contents back and check that this is exactly what the template made.
        contents = [messages[index].content for index in skeleton.order]
        parts = [""] * (2 * len(contents) + 1)
        parts[0::2] = skeleton.pieces
        parts[1::2] = contents
        if "".join(parts) != text:
            return None
        # growth[k]: how much longer the real text is than the skeleton after k slots.
        growth = [
            0,
            *accumulate(map(operator.sub, map(len, contents), skeleton.placeholder_lengths)),
        ]
        spans = []
        for i in turns:
            turn = skeleton.turns.get(i)
            if turn is None:
                return None
            ends_in_special, start, slots_before_start, end, slots_before_end = turn
            start += growth[slots_before_start]
            end += growth[slots_before_end]
            spans.append((start, end) if ends_in_special else self._trained_span(text, start, end))
        return spans

    def _build_skeleton(self, messages: list[Message]) -> _Skeleton | None:
        placeholders = [
            Message(m.role, _placeholder(index), m.train) for index, m in enumerate(messages)
        ]
        try:
            full = self.template.render(placeholders, add_generation_prompt=False)
        except TemplateError:
            return None
        located = []
        for index in range(len(messages)):
            marker = _placeholder(index)
            at = full.find(marker)
            if at < 0 or full.find(marker, at + 1) >= 0:
                return None  # the template drops or repeats contents: no fast path
            located.append((at, index))
        located.sort()
        pieces, order, slot_starts, cursor = [], [], [], 0
        for at, index in located:
            pieces.append(full[cursor:at])
            order.append(index)
            slot_starts.append(at)
            cursor = at + len(_placeholder(index))
        pieces.append(full[cursor:])

        turns: dict[int, tuple[bool, int, int, int, int]] = {}
        for i, message in enumerate(placeholders):
            if message.role != "assistant":
                continue
            try:
                prompt = self.template.render(placeholders[:i], add_generation_prompt=True)
                through = self.template.render(placeholders[: i + 1], add_generation_prompt=False)
            except TemplateError:
                continue
            if full.startswith(prompt) and full.startswith(through) and len(through) >= len(prompt):
                self._check_no_header(message, through[len(prompt) :])
                span = self._span_if_special_end(full, len(prompt), len(through))
                start, end = span if span is not None else (len(prompt), len(through))
                turns[i] = (
                    span is not None,
                    start,
                    bisect_left(slot_starts, start),  # slots that start before it
                    end,
                    bisect_left(slot_starts, end),
                )
        placeholder_lengths = tuple(len(_placeholder(index)) for index in order)
        return _Skeleton(tuple(pieces), tuple(order), placeholder_lengths, turns)
