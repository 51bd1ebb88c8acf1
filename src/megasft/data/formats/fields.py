"""Typed readers of a row's fields, shared by the input formats; each raises a `RowError` that
names the file, the row and the field, with a stable reason code (docs/prepare.md)."""

from __future__ import annotations

from collections.abc import Mapping

from megasft.data.conversation import Message, RowError

_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def required_text(record: dict, field: str, source: str, row: int) -> str:
    """The field's text.

    Raises:
        RowError: "missing_field" when it is missing or null, "wrong_type" when no string.
    """
    value = record.get(field)
    if type(value) is not str:
        raise missing_or_wrong_type(source, row, field, value, "a string")
    return value


def optional_text(record: dict, field: str, source: str, row: int) -> str:
    """The field's text; "" when it is missing or null.

    Raises:
        RowError: "wrong_type" when it is there and no string.
    """
    value = record.get(field)
    if value is None:
        return ""
    if type(value) is not str:
        raise wrong_type(source, row, field, value, "a string")
    return value


def top_level_system(record: dict, source: str, row: int) -> list[Message]:
    """A new list holding the row's `system` message, or an empty one when `system` is missing,
    null or "" (datasets often carry an empty column).

    Raises:
        RowError: "wrong_type" when `system` is no string.
    """
    system = optional_text(record, "system", source, row)
    return [Message("system", system)] if system else []


def missing_or_wrong_type(
    source: str, row: int, field: str, value: object, expected: str
) -> RowError:
    """The error for a required `value` that is not what was `expected`: "missing_field" when
    it is None, else "wrong_type"."""
    if value is None:
        return RowError(source, row, field, "missing_field", "required, but missing or null")
    return wrong_type(source, row, field, value, expected)


def wrong_type(source: str, row: int, field: str, value: object, expected: str) -> RowError:
    """A "wrong_type" error saying what was `expected` and what the value is (JSON's words)."""
    got = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return RowError(source, row, field, "wrong_type", f"expected {expected}, got {got}: {shown}")


def empty_assistant(source: str, row: int, field: str) -> RowError:
    """The error for an assistant answer with nothing to train on."""
    return RowError(
        source,
        row,
        field,
        "empty_assistant",
        "the assistant message is empty (or only whitespace, or null), so there is nothing "
        "to train on",
    )


def key_list(record: Mapping) -> str:
    """The record's first 20 keys, for messages that say which columns a row has."""
    keys = list(record)
    shown = ", ".join(repr(key) for key in keys[:20])
    return f"[{shown}{', ...' if len(keys) > 20 else ''}]"
