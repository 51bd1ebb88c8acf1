"""Input formats (Alpaca, prompt/response, OpenAI messages, ShareGPT), one module each, and the
one way from an input row to its conversation (`RowConverter`).

What each format accepts and the rules they share are in docs/prepare.md ("Input formats"),
with how to add a format: one new module here plus its tests.
"""

from megasft.data.formats.registry import ColumnMap, InputFormat, canonical_fields, input_formats
from megasft.data.formats.rows import (
    FileFormats,
    RowConverter,
    detect_format,
    parse_column_map,
    unknown_format_error,
)

FORMATS = tuple(input_formats())
"""The formats' names, in detection order."""

__all__ = [
    "FORMATS",
    "ColumnMap",
    "FileFormats",
    "InputFormat",
    "RowConverter",
    "canonical_fields",
    "detect_format",
    "input_formats",
    "parse_column_map",
    "unknown_format_error",
]
