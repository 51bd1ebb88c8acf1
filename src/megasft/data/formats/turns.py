"""Lists of turns (OpenAI messages, ShareGPT conversations): the two differ only in their key
names and role tables, so one reader serves both (docs/prepare.md, "Input formats")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from megasft.data.conversation import Message, RowError
from megasft.data.formats.fields import empty_assistant, missing_or_wrong_type, wrong_type
from megasft.data.formats.tools import call_from_text, read_tool_calls


def read_turns(
    record: dict,
    list_field: str,
    role_key: str,
    content_key: str,
    roles: Mapping[str, str],
    source: str,
    row: int,
    call_roles: frozenset[str] = frozenset(),
) -> list[Message]:
    """The messages of the row's list of turns.

    Args:
        record: the row, column-mapped.
        list_field: the field that holds the turns ("messages", "conversations").
        role_key: each turn's role key ("role", "from").
        content_key: each turn's content key ("content", "value").
        roles: the turn's role value -> its role (one of `conversation.ROLES`).
        source: the input file, for errors.
        row: the row number, for errors.
        call_roles: role values whose content is one JSON tool call (ShareGPT
            `function_call`); consecutive calls join the assistant message before them.

    Returns:
        A new list of the messages, in order; OpenAI `tool_calls` become `Message.tool_calls`.

    Raises:
        RowError: for a turn list that is missing, no list or empty; a turn that is no object;
            an unknown role; content that is missing or no text; an assistant turn with
            nothing to train on; a tool call that does not parse; bad `train` / `loss_weight` flags; or no
            assistant turn at all.
    """
    turns = record.get(list_field)
    if type(turns) is not list:
        raise missing_or_wrong_type(source, row, list_field, turns, "an array of messages")
    if not turns:
        raise RowError(
            source, row, list_field, "empty_conversation", "the conversation has no messages"
        )
    messages = []
    has_assistant = False
    for index, turn in enumerate(turns):
        if type(turn) is not dict:
            raise wrong_type(source, row, f"{list_field}[{index}]", turn, "an object")
        role_value = turn.get(role_key)
        role = roles.get(role_value) if type(role_value) is str else None
        if role is None:
            raise _bad_role(source, row, f"{list_field}[{index}].{role_key}", role_value, roles)
        content = turn.get(content_key)
        calls = reasoning = None
        if role == "assistant" and (turn.get("tool_calls") or turn.get("reasoning_content")):
            calls, reasoning = _assistant_extras(turn, f"{list_field}[{index}]", source, row)
            if content is None and calls:
                content = ""
        if type(content) is not str:
            field = f"{list_field}[{index}].{content_key}"
            content = _content_text(content, role, field, source, row)
        if call_roles and role_value in call_roles:
            field = f"{list_field}[{index}].{content_key}"
            calls = (call_from_text(content, field, source, row),)
            content = ""
            previous = messages[-1] if messages else None
            if previous is not None and previous.role == "assistant":
                # A call right after an answer or another call: one assistant message.
                messages[-1] = replace(previous, tool_calls=(*(previous.tool_calls or ()), *calls))
                continue
        if role == "assistant":
            if calls is None and (not content or content.isspace()):
                raise empty_assistant(source, row, f"{list_field}[{index}].{content_key}")
            has_assistant = True
        train = True
        if turn.get("train") is not None or turn.get("loss_weight") is not None:
            train = _train_flag(turn, f"{list_field}[{index}]", source, row)
        messages.append(Message(role, content, train, calls, reasoning))
    if not has_assistant:
        raise RowError(
            source,
            row,
            list_field,
            "no_assistant_turn",
            "the conversation has no assistant message, so there is nothing to train on",
        )
    return messages


def _assistant_extras(
    turn: dict, field: str, source: str, row: int
) -> tuple[tuple[dict, ...] | None, str | None]:
    """An assistant turn's `tool_calls` and `reasoning_content` (None for each it lacks)."""
    calls = turn.get("tool_calls")
    if calls:
        calls = read_tool_calls(calls, f"{field}.tool_calls", source, row)
    reasoning = turn.get("reasoning_content")
    if reasoning is not None and type(reasoning) is not str:
        raise wrong_type(source, row, f"{field}.reasoning_content", reasoning, "a string")
    return calls or None, reasoning or None


def with_turn(record: dict, list_field: str, turn: dict) -> dict | None:
    """A copy of `record` with `turn` appended to its list of turns (in `list_field`, the
    column that holds it); None when that is no list."""
    turns = record.get(list_field)
    if type(turns) is not list:
        return None
    return {**record, list_field: [*turns, turn]}


def _content_text(content: object, role: str, field: str, source: str, row: int) -> str:
    """Content that is not a plain string: a list of text parts, or an error."""
    if content is None and role == "assistant":
        raise empty_assistant(source, row, field)
    if type(content) is not list:
        raise missing_or_wrong_type(source, row, field, content, "a string or a list of parts")
    pieces = []
    for index, part in enumerate(content):
        if type(part) is not dict:
            raise wrong_type(
                source, row, f"{field}[{index}]", part, 'an object {"type": "text", ...}'
            )
        part_type = part.get("type")
        if part_type != "text":
            if type(part_type) is not str:
                raise missing_or_wrong_type(
                    source, row, f"{field}[{index}].type", part_type, "a string"
                )
            raise RowError(
                source,
                row,
                f"{field}[{index}].type",
                "unsupported_content",
                f"content parts of type {part_type!r} are not supported, only 'text': "
                "megasft trains on text. Leave such rows out.",
            )
        text = part.get("text")
        if type(text) is not str:
            raise missing_or_wrong_type(source, row, f"{field}[{index}].text", text, "a string")
        pieces.append(text)
    return "".join(pieces)


def _train_flag(turn: dict, field: str, source: str, row: int) -> bool:
    """The message's `train` / `loss_weight`, which must agree when both are given."""
    train = turn.get("train")
    if train is not None and type(train) is not bool:
        raise wrong_type(source, row, f"{field}.train", train, "true or false")
    weight = turn.get("loss_weight")
    if weight is None:
        return train
    if type(weight) not in (int, float):
        raise wrong_type(source, row, f"{field}.loss_weight", weight, "a number, 0 or 1")
    if weight not in (0, 1):
        raise RowError(
            source,
            row,
            f"{field}.loss_weight",
            "unsupported_loss_weight",
            f"loss_weight {weight!r} is not supported: only 0 (do not train on this message) "
            "and 1 (train on it) are",
        )
    if train is not None and train != (weight == 1):
        raise RowError(
            source,
            row,
            field,
            "conflicting_train_flags",
            f"train is {str(train).lower()} but loss_weight is {weight!r}; give one, or make "
            "them agree",
        )
    return weight == 1


def _bad_role(
    source: str, row: int, field: str, value: object, roles: Mapping[str, str]
) -> RowError:
    if type(value) is not str:
        return missing_or_wrong_type(source, row, field, value, "a string")
    return RowError(
        source,
        row,
        field,
        "unknown_role",
        f"unknown role {value!r}; allowed: {', '.join(roles)}",
    )
