"""Helpers for the input format tests: convert one record the way `prepare` does."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message, RowError
from megasft.data.formats import RowConverter

S, U, A, T = "system", "user", "assistant", "tool"


def convert(record: dict, fmt: str = "auto", **options) -> list[Message]:
    """The messages of `record` read as `fmt` with `RowConverter` options (column_map,
    system_prompt)."""
    return RowConverter(fmt, **options).convert(record, "in.jsonl", 1).messages


def error_for(record: dict, fmt: str = "auto", **options) -> RowError:
    """The RowError that converting `record` raises (as row 5 of in.jsonl)."""
    with pytest.raises(RowError) as caught:
        RowConverter(fmt, **options).convert(record, "in.jsonl", 5)
    error = caught.value
    assert (error.source, error.row) == ("in.jsonl", 5)
    return error


def rejected(record: dict, fmt: str = "auto", **options) -> tuple[str | None, str]:
    """(field, reason) of the RowError that converting `record` raises."""
    error = error_for(record, fmt, **options)
    return error.field, error.reason
