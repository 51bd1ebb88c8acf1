"""The one way from an input row to its conversation (`RowConverter`), column maps (`--map`),
and the rule that a file holds one format (`FileFormats`). docs/prepare.md, "Input formats"."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from megasft.data.conversation import Conversation, Message, RowError
from megasft.data.formats.fields import key_list
from megasft.data.formats.registry import (
    ColumnMap,
    InputFormat,
    canonical_fields,
    input_formats,
)
from megasft.errors import ConfigError


class RowConverter:
    """Turns input rows (dicts) into conversations, for one `--format`, `--map` and
    `--system-prompt`. Picklable.

    With format "auto", each row's format is detected from its keys; keeping a file to one
    format is `FileFormats`' job, in the one process that sees rows in order.
    """

    def __init__(
        self,
        fmt: str = "auto",
        column_map: ColumnMap | None = None,
        system_prompt: str | None = None,
    ):
        """
        Args:
            fmt: a format's name, or "auto".
            column_map: canonical field -> the input column that holds it (checked where it
                is parsed, `parse_column_map`; a name no format reads is copied and ignored).
            system_prompt: added as a leading system message to conversations without one.

        Raises:
            ConfigError: for an unknown format.
        """
        formats = input_formats()
        if fmt != "auto" and fmt not in formats:
            raise ConfigError(f"unknown --format {fmt!r}; use auto or one of: {', '.join(formats)}")
        self.format: InputFormat | None = None if fmt == "auto" else formats[fmt]
        self.column_map = dict(column_map) if column_map else None
        self.system_prompt = system_prompt
        column_map = self.column_map or {}
        # (the input column that identifies a format, that format), in detection order: a raw
        # row is recognised without applying the map first.
        self._detection = tuple(
            (column_map.get(candidate.detection_key, candidate.detection_key), candidate)
            for candidate in formats.values()
        )

    def convert(self, record: dict, source: str, row: int) -> Conversation:
        """The row's conversation.

        Args:
            record: the row as read (`readers.parse_payload`).
            source: the input file, for errors.
            row: the 1-based row number, for errors.

        Returns:
            The conversation, in the format given or detected.

        Raises:
            RowError: "unknown_format" for a row no format recognises (with "auto"), else what
                the format raises, its field named by the input column it came from.
        """
        fmt = self.format
        if fmt is None:
            fmt = self.detect(record)
            if fmt is None:
                raise unknown_format_error(record, source, row)
        if self.column_map:
            record = apply_column_map(record, self.column_map, source, row)
        try:
            conversation = fmt.convert(record, source, row)
        except RowError as error:
            raise self._explained(error, record, fmt) from None
        system_prompt = self.system_prompt
        if system_prompt and not any(m.role == "system" for m in conversation.messages):
            conversation.messages.insert(0, Message("system", system_prompt))
        return conversation

    def detect(self, record: Mapping) -> InputFormat | None:
        """The format of a row (not column-mapped) by its keys, or None when none matches."""
        for column, candidate in self._detection:
            if record.get(column) is not None:
                return candidate
        return None

    def with_answer(self, record: dict, answer: str) -> dict | None:
        """A copy of a row (not column-mapped) that ends in the assistant answer `answer`, for
        rows that hold only a prompt; None when the row's format is unknown or it cannot get
        one (see `InputFormat.with_answer`)."""
        fmt = self.format or self.detect(record)
        return None if fmt is None else fmt.with_answer(record, answer, self.column_map or {})

    def _explained(self, error: RowError, record: Mapping, fmt: InputFormat) -> RowError:
        """The error with the field named as in the input, and a hint when a whole field is
        missing. Runs only for rejected rows, so it may take its time."""
        field, message = error.field, error.message
        if error.reason == "missing_field" and field in canonical_fields():
            row_format = detect_format(record)
            if row_format not in (None, fmt.name):
                message += (
                    f"; this row looks like {row_format} format, not {fmt.name}: check --format"
                )
            else:
                message += f"; {fmt.name} rows need {fmt.needs}"
        if self.column_map and field:
            cut = min((i for i in (field.find("["), field.find(".")) if i >= 0), default=len(field))
            column = self.column_map.get(field[:cut])
            if column is not None:
                field = column + field[cut:]
        return RowError(error.source, error.row, field, error.reason, message)


def detect_format(record: Mapping, column_map: ColumnMap | None = None) -> str | None:
    """The name of the format a row is in, by its keys, or None when it matches none.

    Args:
        record: the row.
        column_map: when given, the row is looked at as if the map had been applied.
    """
    fmt = RowConverter(column_map=column_map).detect(record)
    return None if fmt is None else fmt.name


class FileFormats:
    """The format of each input file: that of the first of its rows that is checked (`prepare`
    checks the rows it accepts, in input order). A later row in another format is rejected."""

    def __init__(self) -> None:
        self.by_source: dict[str, str] = {}
        """Source -> its format."""

    def check(self, source: str, row: int, fmt: str) -> RowError | None:
        """Locks `source` to `fmt` if it has no format yet.

        Returns:
            None when the row's format `fmt` is the file's, else the "mixed_formats" error.
        """
        locked = self.by_source.setdefault(source, fmt)
        if locked == fmt:
            return None
        return RowError(
            source,
            row,
            None,
            "mixed_formats",
            f"this row is in {fmt} format, but the file's first row was in {locked} "
            "format, and a file must hold one format. Split the file by format, or pass --format "
            "to read every row as one format.",
        )


def parse_column_map(text: str) -> dict[str, str]:
    """Parse `--map` text such as "prompt=question,response=answer" into a column map.

    Each entry is CANONICAL=COLUMN, entries separated by commas, spaces around names ignored.
    Column names cannot contain "," or "=". Empty text gives an empty map.

    Raises:
        ConfigError: for a malformed entry, an unknown canonical name or one given twice.
    """
    column_map: dict[str, str] = {}
    if not text.strip():
        return column_map
    for entry in text.split(","):
        canonical, equals, column = (part.strip() for part in entry.partition("="))
        if not equals or not canonical or not column:
            raise ConfigError(
                f"--map {text!r}: {entry.strip()!r} is not CANONICAL=COLUMN; write pairs "
                "separated by commas, e.g. --map prompt=question,response=answer"
            )
        if canonical in column_map:
            raise ConfigError(f"--map {text!r}: {canonical!r} is mapped twice")
        column_map[canonical] = column
    check_column_map(column_map)
    return column_map


def check_column_map(column_map: ColumnMap) -> None:
    """Raises `ConfigError` for a canonical name that no format reads, with a suggestion."""
    fields = canonical_fields()
    for canonical in column_map:
        if canonical in fields:
            continue
        if column_map[canonical] in fields:
            hint = (
                f"; the form is CANONICAL=COLUMN, did you mean {column_map[canonical]}={canonical}?"
            )
        elif close := difflib.get_close_matches(canonical, fields, n=1):
            hint = f"; did you mean {close[0]!r}?"
        else:
            hint = ""
        raise ConfigError(
            f"--map: {canonical!r} is not a field any format reads (they are: "
            f"{', '.join(fields)}){hint}"
        )


def apply_column_map(record: dict, column_map: ColumnMap, source: str, row: int) -> dict:
    """A shallow copy of `record` in which each canonical field holds its mapped column's value.

    The source columns stay (they are ignored like any extra key).

    Raises:
        RowError: "missing_field", naming the column, for a mapped column the row lacks.
    """
    mapped = dict(record)
    for canonical, column in column_map.items():
        if column not in record:
            raise RowError(
                source,
                row,
                column,
                "missing_field",
                f"--map {canonical}={column} names a column this row does not have; its "
                f"columns are {key_list(record)}",
            )
        mapped[canonical] = record[column]
    return mapped


def unknown_format_error(record: Mapping, source: str, row: int) -> RowError:
    """The "unknown_format" rejection of a row that no format recognises."""
    formats = list(input_formats().values())
    expected = ", ".join(fmt.shape for fmt in formats[:-1])
    return RowError(
        source,
        row,
        None,
        "unknown_format",
        f"the row matches no known format; its keys are {key_list(record)}. Expected "
        f"{expected} or {formats[-1].shape}. If the columns have other names, map them "
        "with --map, e.g. --map prompt=question,response=answer",
    )
