"""Stream raw rows out of input files: JSON Lines, JSON arrays and Parquet, optionally gzip'd.

Files are only split into rows here, never held whole in memory; a JSONL row stays as its line
bytes so that JSON decoding (`parse_payload`) runs in the worker processes. A bad row becomes a
`RowError` for that row; a whole-file problem that lets the run go on (an empty file, a
truncated gzip, a JSON file that is no array) a `RowError` with `row=0`, after every row read
before it. Files that cannot be read at all are refused up front by `check_inputs`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megasft.data.conversation import RowError
from megasft.data.json_stream import InvalidUtf8, JsonArrayScanner, decode_utf8_chunks
from megasft.errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SUFFIX_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
_BUFFER_BYTES = 1 << 20
"""Read buffer for input files; large reads keep the per-line cost low."""
_SNIFF_BYTES = 1 << 16
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True, slots=True)
class RawRow:
    """One row as read from a file, before it is decoded or checked."""

    source: str
    """The path as given."""
    row: int
    """1-based: the JSONL line number (blank lines count, so it matches an editor), the JSON
    array index + 1, or the Parquet row index + 1."""
    payload: bytes | dict
    """JSONL: the raw line (decoded later by `parse_payload`, in a worker). JSON array and
    Parquet: the already decoded record."""


def check_inputs(paths: Sequence[str | Path]) -> None:
    """Refuse, before any work starts, input paths that cannot be read at all.

    Raises `InputError` naming every bad path and what to do about it: a missing path, a
    directory, something that is not a regular file (a pipe: rows are read with seeks), or a
    file this process may not read. The content is not looked at here; problems inside a file
    are reported per row by `iter_raw_rows`.
    """
    if not paths:
        raise InputError("no input files were given; pass one or more files with --input")
    problems = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            problems.append(f"{path}: no such file (relative paths are taken from {Path.cwd()})")
        elif path.is_dir():
            problems.append(
                f"{path}: is a directory; pass the data files in it instead, "
                f"e.g. --input {path}/*.jsonl"
            )
        elif not path.is_file():
            problems.append(
                f"{path}: not a regular file (a pipe or a device); write the data to a file first"
            )
        elif not os.access(path, os.R_OK):
            problems.append(f"{path}: permission denied; make the file readable for this user")
    if problems:
        raise InputError("cannot read the input:\n  " + "\n  ".join(problems))


def iter_raw_rows(path: str | Path) -> Iterator[RawRow | RowError]:
    """Yield the rows of one input file in order, as `RawRow`s, and `RowError`s for bad rows.

    The file kind comes from the suffix (`.jsonl`, `.ndjson`, `.json`, `.parquet`, each with an
    optional `.gz`); gzip itself is recognised by its magic bytes, whatever the name. For any
    other suffix the content decides: Parquet's `PAR1` magic, else the first non-space
    character, `[` for a JSON array and anything else for JSON Lines.

    A `.json` file that starts with `{` and whose first line is a whole JSON value is read as
    JSON Lines: that is what `datasets.Dataset.to_json` writes by default.

    Streaming: JSONL is read line by line; JSON arrays are decoded one element at a time (memory
    grows with the largest element, not the file; but a syntax error inside an element is only
    recognised once the rest of the file has been read, since it could be an element split
    across reads); Parquet is read one record batch at a time.

    Blank lines in JSONL are skipped (they still count for line numbers), a UTF-8 byte order
    mark at the start of a file is dropped, and CRLF line ends are fine.

    After the valid rows, a `RowError` with `row=0` reports a whole-file problem: "empty_file"
    (no rows at all), "not_a_json_array" (a JSON file whose top level is not an array),
    "unreadable_file" (corrupt or truncated gzip, unreadable Parquet), "invalid_utf8" (a UTF-16
    file), or "malformed_json" (a JSON array cut short before its "]", or text after it).
    """
    source = str(path)
    last_row = 0
    try:
        for item in _iter_file(Path(path), source):
            last_row = item.row or last_row
            yield item
    except (OSError, EOFError, zlib.error, _UnreadableFile) as error:
        where = f"after row {last_row}" if last_row else "before the first row"
        yield RowError(
            source,
            0,
            None,
            "unreadable_file",
            f"the file could not be read {where} ({error}); the rows before that were kept. "
            "The file is probably truncated or corrupt: download or compress it again.",
        )


def parse_payload(raw: RawRow) -> dict:
    """Decode a JSONL line into its record; a record that is already decoded is returned as is.

    Raises `RowError` with reason "invalid_utf8" (the line is not strict UTF-8),
    "malformed_json" (json's message, with the column), or "not_an_object" (valid JSON, but not
    an object).
    """
    payload = raw.payload
    if type(payload) is dict:
        return payload
    try:
        # Strict decoding first: json.loads(bytes) would guess UTF-16/32 and let lone surrogate
        # bytes through instead of failing.
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = payload[error.start : error.end]
        raise RowError(
            raw.source,
            raw.row,
            None,
            "invalid_utf8",
            f"the line is not valid UTF-8: {error.reason} {bad!r} at byte offset {error.start} "
            "of the line; re-encode the file as UTF-8",
        ) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RowError(
            raw.source,
            raw.row,
            None,
            "malformed_json",
            f"the line is not valid JSON: {error.msg} at column {error.colno}",
        ) from None
    if type(record) is not dict:
        raise _not_an_object(raw.source, raw.row, record)
    return record


class _UnreadableFile(Exception):
    """The file cannot be read further; turned into an "unreadable_file" row error."""


def _iter_file(path: Path, source: str) -> Iterator[RawRow | RowError]:
    with open(path, "rb", buffering=_BUFFER_BYTES) as raw_stream:
        gzipped = raw_stream.read(2) == _GZIP_MAGIC
        raw_stream.seek(0)
        stream = gzip.GzipFile(fileobj=raw_stream) if gzipped else raw_stream
        if stream.read(2) in _UTF16_BOMS:
            yield RowError(
                source,
                0,
                None,
                "invalid_utf8",
                "the file is UTF-16 (as Windows tools often write), not UTF-8; re-encode it, "
                "e.g. iconv -f UTF-16 -t UTF-8",
            )
            return
        stream.seek(0)
        kind = _file_kind(path, stream)
        if kind == "parquet":
            # pyarrow reads a plain file itself, faster than through a Python file object.
            yield from _iter_parquet(stream if gzipped else path, source)
        elif kind == "json":
            yield from _iter_json_array(stream, source)
        else:
            yield from _iter_jsonl(stream, source)


def _file_kind(path: Path, stream: io.BufferedIOBase) -> str:
    """Which reader the file needs: "jsonl", "json" or "parquet". Leaves `stream` at its start."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    kind = _SUFFIX_KINDS.get(suffixes[-1]) if suffixes else None
    if kind in ("jsonl", "parquet"):
        return kind
    head = stream.read(_SNIFF_BYTES)
    stream.seek(0)
    if kind is None and head.startswith(_PARQUET_MAGIC):
        return "parquet"
    first = head.removeprefix(_UTF8_BOM).lstrip()[:1]
    if kind == "json":
        # JSON Lines under a .json name, or else a JSON file (reported if it is no array).
        return "jsonl" if first == b"{" and _first_line_is_json(stream) else "json"
    return "json" if first == b"[" else "jsonl"


def _first_line_is_json(stream: io.BufferedIOBase) -> bool:
    line = stream.readline().removeprefix(_UTF8_BOM)
    while line.isspace():
        line = stream.readline()
    stream.seek(0)
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return True


def _iter_jsonl(stream: io.BufferedIOBase, source: str) -> Iterator[RawRow | RowError]:
    saw_row = False
    for line_number, line in enumerate(stream, start=1):
        if line_number == 1:
            line = line.removeprefix(_UTF8_BOM)
        if line.isspace() or not line:
            continue
        saw_row = True
        yield RawRow(source, line_number, line)
    if not saw_row:
        yield _empty_file(source)


def _iter_parquet(file: Path | io.BufferedIOBase, source: str) -> Iterator[RawRow | RowError]:
    import pyarrow
    import pyarrow.parquet

    row = 0
    try:
        parquet_file = pyarrow.parquet.ParquetFile(file)
        for batch in parquet_file.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            # to_pylist turns nested columns (list<struct<role, content>>) into lists of dicts.
            for record in batch.to_pylist():
                row += 1
                yield RawRow(source, row, record)
    except pyarrow.ArrowException as error:
        raise _UnreadableFile(f"Parquet: {error}") from error
    if row == 0:
        yield _empty_file(source)


def _iter_json_array(stream: io.BufferedIOBase, source: str) -> Iterator[RawRow | RowError]:
    """Decode a top-level JSON array one element at a time (see `JsonArrayScanner`)."""
    scanner = JsonArrayScanner(decode_utf8_chunks(stream))
    index = 0
    try:
        first = scanner.next_char()
        if first == "":
            yield _empty_file(source)
            return
        if first != "[":
            yield RowError(
                source,
                0,
                None,
                "not_a_json_array",
                f"a .json file must hold one array of records, [{{...}}, {{...}}], but this "
                f"one starts with {first!r}. For one record per line, name the file .jsonl.",
            )
            return
        scanner.advance()
        if scanner.next_char() == "]":
            scanner.advance()
        else:
            while True:
                value = scanner.decode_value()
                index += 1
                if type(value) is dict:
                    yield RawRow(source, index, value)
                else:
                    yield _not_an_object(source, index, value)
                separator = scanner.next_char()
                scanner.advance()
                if separator == "]":
                    break
                if separator == "":
                    yield RowError(
                        source,
                        0,
                        None,
                        "malformed_json",
                        f"the file ends after element {index} without the array's closing ']'; "
                        "the elements read were kept. The file is probably truncated.",
                    )
                    return
                if separator != ",":
                    raise json.JSONDecodeError(
                        "Expecting ',' or ']' after an array element", scanner.text, scanner.pos
                    )
        if scanner.next_char() != "":
            yield RowError(
                source,
                0,
                None,
                "malformed_json",
                "there is more text after the array's closing ']'; it was not read. "
                "A .json file must hold exactly one array.",
            )
        elif index == 0:
            yield _empty_file(source)
    except json.JSONDecodeError as error:
        yield RowError(
            source,
            index + 1,
            None,
            "malformed_json",
            f"the JSON array breaks at element {index + 1}: {error.msg}; the elements before it "
            "were kept, the rest of the file could not be read. Fix the file, or convert it to "
            "JSON Lines so that one bad record does not hide the ones after it.",
        )
    except InvalidUtf8 as error:
        yield RowError(
            source,
            index + 1,
            None,
            "invalid_utf8",
            f"byte offset {error.offset} of the file is not valid UTF-8 (in or before element "
            f"{index + 1}); the elements before it were kept, the rest of the file could not "
            "be read. Re-encode the file as UTF-8.",
        )


def _empty_file(source: str) -> RowError:
    return RowError(
        source,
        0,
        None,
        "empty_file",
        "the file holds no rows (it is empty or only blank); check that it was written "
        "completely, or leave it out of --input",
    )


_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number"}


def _not_an_object(source: str, row: int, value: object) -> RowError:
    if value is None or type(value) is bool:
        got = json.dumps(value)
    else:
        got = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    return RowError(
        source,
        row,
        None,
        "not_an_object",
        f"a record must be a JSON object {{...}}, got {got}",
    )
