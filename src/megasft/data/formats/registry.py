"""The input format interface and the registry of formats, found in the modules of this package.

Each format lives in one module of `megasft.data.formats` and registers itself with
`@register_format`; the registry imports those modules on first use, so a new format is one new
module plus its tests (docs/prepare.md, "Adding an input format").
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, TypeVar

from megasft.data.conversation import Conversation

ColumnMap = Mapping[str, str]
"""Canonical field name (a format's `fields`) -> the column of the input that holds it."""


class InputFormat:
    """One input format: how to recognise its rows, which fields it reads, how a row becomes a
    conversation. Stateless; one instance each, made by `register_format`."""

    name: ClassVar[str]
    """What `--format` calls it, and the manifest's `sources[].format`."""
    detection_key: ClassVar[str]
    """A row whose `detection_key` is present and not null is in this format ..."""
    detection_rank: ClassVar[int]
    """... unless a format of lower rank recognises it first (a row can hold several keys)."""
    fields: ClassVar[tuple[str, ...]]
    """Every field of a row it reads: the names a column map (`--map`) may remap."""
    needs: ClassVar[str]
    """What its rows must hold, in words, for the hint of a "missing_field" rejection."""
    shape: ClassVar[str]
    """Its rows' keys in a few words, for the "unknown_format" rejection."""

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        """The conversation of one row.

        Args:
            record: the row, its mapped columns already under their canonical names.
            source: the input file, for errors.
            row: the 1-based row number, for errors.

        Returns:
            The row's conversation, in this format's name; its message list is new.

        Raises:
            RowError: for a row that cannot be used, naming the field as this format reads it
                (`megasft.data.formats.RowConverter` renames mapped fields afterwards).
        """
        raise NotImplementedError

    def with_answer(self, record: dict, answer: str, column_map: ColumnMap) -> dict | None:
        """A copy of `record` (not column-mapped) that ends in the assistant answer `answer`,
        for a row that holds only a prompt (evaluation); None when it cannot get one.

        Args:
            record: the row as read.
            answer: the stand-in answer text.
            column_map: the map the row is read with (may be empty).

        Returns:
            The copy, or None (say, when the list of turns is no list).
        """
        raise NotImplementedError


FormatType = TypeVar("FormatType", bound=type[InputFormat])

_FORMATS: dict[str, InputFormat] = {}
_discovered = False


def register_format(cls: FormatType) -> FormatType:
    """Class decorator: makes an instance of `cls` the format `cls.name`.

    Raises:
        ValueError: when another format has the same name, detection key or rank.
    """
    for other in _FORMATS.values():
        clash = [
            what
            for what in ("name", "detection_key", "detection_rank")
            if getattr(other, what) == getattr(cls, what)
        ]
        if clash and type(other) is not cls:
            raise ValueError(f"formats {other.name!r} and {cls.name!r} share their {clash[0]}")
    _FORMATS[cls.name] = cls()
    return cls


def input_formats() -> dict[str, InputFormat]:
    """Every registered format by name, in detection order (lowest `detection_rank` first)."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__package__}.{module.name}")
        _discovered = True
    return dict(sorted(_FORMATS.items(), key=lambda item: item[1].detection_rank))


def canonical_fields() -> tuple[str, ...]:
    """The fields any format reads, each once, format by format in detection order."""
    return tuple(dict.fromkeys(field for fmt in input_formats().values() for field in fmt.fields))
