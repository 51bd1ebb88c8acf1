"""megasft.data.readers: every input kind, and every way a file can be broken."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megasft.data import json_stream, readers
from megasft.data.conversation import RowError
from megasft.data.readers import RawRow, check_inputs, iter_raw_rows, parse_payload
from megasft.errors import InputError

GOOD = {"prompt": "2+2?", "response": "4"}
GOOD_LINE = json.dumps(GOOD).encode()


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def read_all(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str | None, str]]]:
    """(row, record) for every good row and (row, field, reason) for every rejected one."""
    records, errors = [], []
    for item in iter_raw_rows(path):
        if isinstance(item, RowError):
            errors.append((item.row, item.field, item.reason))
            continue
        assert item.source == str(path)
        try:
            records.append((item.row, parse_payload(item)))
        except RowError as error:
            errors.append((error.row, error.field, error.reason))
    return records, errors


def error_items(path: Path) -> list[RowError]:
    return [item for item in iter_raw_rows(path) if isinstance(item, RowError)]


# --- JSON Lines --------------------------------------------------------------------------------


def test_jsonl_rows_are_raw_lines_numbered_like_an_editor(tmp_path):
    path = write(tmp_path, "data.jsonl", b'{"a": 1}\n\n   \n\t\n{"a": 2}\n{"a": 3}')
    items = list(iter_raw_rows(path))
    assert items == [
        RawRow(str(path), 1, b'{"a": 1}\n'),
        RawRow(str(path), 5, b'{"a": 2}\n'),
        RawRow(str(path), 6, b'{"a": 3}'),
    ]
    assert [parse_payload(item) for item in items] == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_jsonl_with_crlf_line_ends_and_a_byte_order_mark(tmp_path):
    path = write(tmp_path, "data.jsonl", b'\xef\xbb\xbf{"a": "x"}\r\n\r\n{"a": "y\\r\\n"}\r\n')
    records, errors = read_all(path)
    assert records == [(1, {"a": "x"}), (3, {"a": "y\r\n"})]
    assert errors == []


def test_ndjson_suffix_and_source_is_the_path_as_given(tmp_path, monkeypatch):
    write(tmp_path, "data.ndjson", GOOD_LINE + b"\n")
    monkeypatch.chdir(tmp_path)
    (item,) = iter_raw_rows("data.ndjson")
    assert item.source == "data.ndjson"


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.jsonl", "data.gz", "data.bin"])
def test_gzip_is_recognised_by_its_magic_bytes_whatever_the_name(tmp_path, name):
    path = write(tmp_path, name, gzip.compress(b'\xef\xbb\xbf{"a": 1}\r\n\n{"a": 2}\n'))
    assert read_all(path) == ([(1, {"a": 1}), (3, {"a": 2})], [])


def test_a_gz_suffix_on_a_plain_file_is_read_as_plain(tmp_path):
    path = write(tmp_path, "data.jsonl.gz", GOOD_LINE + b"\n")
    assert read_all(path) == ([(1, GOOD)], [])


# --- JSON arrays -------------------------------------------------------------------------------

RECORDS = [{"id": index, "text": "héllo ✓ " * index, "n": [1.5, None, True]} for index in range(30)]


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 7, 64, 1 << 20])
def test_json_array_elements_split_across_reads(tmp_path, monkeypatch, read_bytes):
    # Small reads split elements, numbers and multi-byte characters at every possible place.
    monkeypatch.setattr(json_stream, "JSON_READ_BYTES", read_bytes)
    data = b"\xef\xbb\xbf " + json.dumps(RECORDS, ensure_ascii=False, indent=1).encode()
    path = write(tmp_path, "data.json", data)
    items = list(iter_raw_rows(path))
    assert [(item.row, item.payload) for item in items] == list(enumerate(RECORDS, start=1))


@pytest.mark.parametrize("read_bytes", [1, 1 << 20])
def test_json_array_number_split_across_reads(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(json_stream, "JSON_READ_BYTES", read_bytes)
    path = write(tmp_path, "data.json", b'[12345, {"a": 1}, 67890]')
    assert [(item.row, item.reason, item.message) for item in error_items(path)] == [
        (1, "not_an_object", "a record must be a JSON object {...}, got a number"),
        (3, "not_an_object", "a record must be a JSON object {...}, got a number"),
    ]


def test_json_array_gzipped_and_with_an_unknown_suffix(tmp_path):
    data = json.dumps(RECORDS[:3]).encode()
    for name, content in [("a.json.gz", gzip.compress(data)), ("a.txt", b"\n  " + data)]:
        path = write(tmp_path, name, content)
        assert read_all(path) == (list(enumerate(RECORDS[:3], start=1)), [])


def test_json_array_is_decoded_lazily(monkeypatch):
    # The scanner asks for text only when the next element needs it: streaming, not a load.
    consumed = []

    def chunks():
        for index in range(1000):
            consumed.append(index)
            yield ("[" if index == 0 else ",") + json.dumps({"id": index})
        yield "]"

    scanner = json_stream.JsonArrayScanner(chunks())
    assert scanner.next_char() == "["
    scanner.advance()
    assert scanner.decode_value() == {"id": 0}
    assert len(consumed) <= 2


def test_a_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    # `datasets.Dataset.to_json("x.json")` writes JSON Lines.
    path = write(tmp_path, "data.json", b'\n{"a": 1}\n{"a": 2}\n')
    assert read_all(path) == ([(2, {"a": 1}), (3, {"a": 2})], [])


def test_json_rows_are_dicts_not_bytes(tmp_path):
    path = write(tmp_path, "data.json", b'[{"a": 1}]')
    (item,) = iter_raw_rows(path)
    assert item.payload == {"a": 1}
    assert parse_payload(item) is item.payload


# --- Parquet -----------------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def test_parquet_nested_messages_column_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_PARQUET_BATCH_ROWS", 2)
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(5)
    ]
    # A field only some messages have is filled with null in the others (see formats).
    rows[4]["messages"][1]["train"] = False
    path = write_parquet(tmp_path / "data.parquet", rows, row_group_size=3)
    records, errors = read_all(path)
    assert errors == []
    assert [row for row, _ in records] == [1, 2, 3, 4, 5]
    assert records[0][1] == {
        "messages": [
            {"role": "user", "content": "q0", "train": None},
            {"role": "assistant", "content": "a", "train": None},
        ]
    }
    assert records[4][1]["messages"][1]["train"] is False


def test_parquet_found_by_its_magic_without_a_suffix_and_gzipped(tmp_path):
    plain = write_parquet(tmp_path / "data.parquet", [GOOD, GOOD])
    for name, content in [
        ("data", plain.read_bytes()),
        ("d.gz", gzip.compress(plain.read_bytes())),
    ]:
        path = write(tmp_path, name, content)
        assert read_all(path) == ([(1, GOOD), (2, GOOD)], [])


# --- one row is bad ----------------------------------------------------------------------------


def test_bad_lines_are_rejected_and_every_good_line_is_kept(tmp_path):
    lines = [
        GOOD_LINE,  # 1
        b'{"prompt": "x", "response": }',  # 2
        GOOD_LINE,  # 3
        b'{"prompt": "caf\xe9"}',  # 4: Latin-1, not UTF-8
        b"",  # 5: blank, skipped
        b"[1, 2]",  # 6
        b'"just a string"',  # 7
        b"null",  # 8
        b'{"a": 1} {"b": 2}',  # 9: two objects on one line
        b"\xff" + GOOD_LINE,  # 10
        b'{"a": 1',  # 11: cut short
        GOOD_LINE,  # 12
    ]
    path = write(tmp_path, "data.jsonl", b"\n".join(lines) + b"\n")
    records, errors = read_all(path)
    assert records == [(1, GOOD), (3, GOOD), (12, GOOD)]
    assert errors == [
        (2, None, "malformed_json"),
        (4, None, "invalid_utf8"),
        (6, None, "not_an_object"),
        (7, None, "not_an_object"),
        (8, None, "not_an_object"),
        (9, None, "malformed_json"),
        (10, None, "invalid_utf8"),
        (11, None, "malformed_json"),
    ]


def test_parse_errors_say_where_in_the_line():
    def error_for(line: bytes) -> RowError:
        with pytest.raises(RowError) as caught:
            parse_payload(RawRow("in.jsonl", 7, line))
        return caught.value

    error = error_for(b'{"prompt": "caf\xe9"}\n')
    assert (error.source, error.row, error.reason) == ("in.jsonl", 7, "invalid_utf8")
    assert "byte offset 15" in error.message and "\\xe9" in error.message
    error = error_for(b'{"prompt": "x",}\n')
    assert error.reason == "malformed_json"
    assert error.message == (
        "the line is not valid JSON: Expecting property name enclosed in double quotes at column 16"
    )
    assert error_for(b"[]").message == "a record must be a JSON object {...}, got an array"
    assert error_for(b"true").message == "a record must be a JSON object {...}, got true"
    # json.loads(bytes) alone would take UTF-16 happily.
    assert error_for('{"a": 1}'.encode("utf-16")).reason == "invalid_utf8"


def test_row_errors_survive_pickling(tmp_path):
    with pytest.raises(RowError) as caught:
        parse_payload(RawRow("in.jsonl", 3, b"{"))
    assert pickle.loads(pickle.dumps(caught.value)) == caught.value


# --- the whole file is bad ---------------------------------------------------------------------


def empty_parquet(path: Path) -> bytes:
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \r\n\n"),
        ("bom.jsonl", b"\xef\xbb\xbf"),
        ("empty.jsonl.gz", gzip.compress(b"")),
        ("empty.json", b""),
        ("blank.json", b" \n"),
        ("empty_array.json", b" [ ] \n"),
        ("empty.txt", b""),
        ("empty.parquet", None),
    ],
)
def test_a_file_with_no_rows_is_one_empty_file_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if content is not None else empty_parquet(path))
    (error,) = list(iter_raw_rows(path))
    assert error.source == str(path)
    assert (error.row, error.field, error.reason) == (0, None, "empty_file")


def test_truncated_gzip_keeps_the_rows_before_the_break(tmp_path):
    data = gzip.compress(b"".join(b'{"id": %d}\n' % index for index in range(20_000)))
    path = write(tmp_path, "data.jsonl.gz", data[: len(data) // 2])
    items = list(iter_raw_rows(path))
    *rows, error = items
    assert (error.row, error.field, error.reason) == (0, None, "unreadable_file")
    assert f"after row {len(rows)}" in error.message
    assert 0 < len(rows) < 20_000
    assert [parse_payload(row) for row in rows] == [{"id": index} for index in range(len(rows))]


def test_a_gzip_with_a_damaged_header_is_unreadable(tmp_path):
    data = bytearray(gzip.compress(GOOD_LINE))
    data[3] = 0xFF  # reserved flag bits: gzip refuses the header
    path = write(tmp_path, "data.jsonl.gz", bytes(data))
    assert read_all(path) == ([], [(0, None, "unreadable_file")])


def test_corrupt_and_truncated_parquet_are_unreadable(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", [GOOD] * 10).read_bytes()
    for name, content in [("junk.parquet", b"PAR1 not really"), ("cut.parquet", good[:-20])]:
        path = write(tmp_path, name, content)
        assert read_all(path) == ([], [(0, None, "unreadable_file")])


@pytest.mark.parametrize("content", [b'{\n  "prompt": "x"\n}\n', b'"text"', b"42"])
def test_a_json_file_that_is_not_an_array(tmp_path, content):
    path = write(tmp_path, "data.json", content)
    (error,) = list(iter_raw_rows(path))
    assert (error.row, error.field, error.reason) == (0, None, "not_a_json_array")
    assert ".jsonl" in error.message


def test_json_array_with_non_object_elements(tmp_path):
    path = write(tmp_path, "data.json", b'[{"a": 1}, [1], "s", null, 3.5, {"a": 2}]')
    assert read_all(path) == (
        [(1, {"a": 1}), (6, {"a": 2})],
        [(2, None, "not_an_object"), (3, None, "not_an_object"), (4, None, "not_an_object"),
         (5, None, "not_an_object")],
    )  # fmt: skip


@pytest.mark.parametrize(
    "content, expected_error",
    [
        (b'[{"a": 1}, {"a": 2} {"a": 3}]', (3, None, "malformed_json")),  # no comma
        (b'[{"a": 1}, {"a": 2}, {"a": }]', (3, None, "malformed_json")),
        (b'[{"a": 1}, {"a": 2}, {"a": 3', (3, None, "malformed_json")),  # cut in an element
        (b'[{"a": 1}, {"a": 2}, ', (3, None, "malformed_json")),
        (b'[{"a": 1}, {"a": 2}', (0, None, "malformed_json")),  # cut before the "]"
        (b'[{"a": 1}, {"a": 2}] [{"a": 3}]', (0, None, "malformed_json")),  # text after it
        (b'[{"a": 1}, {"a": 2}, {"a": "\xff"}, {"a": 4}]', (3, None, "invalid_utf8")),
    ],
)
def test_a_broken_json_array_keeps_the_elements_before_the_break(tmp_path, content, expected_error):
    path = write(tmp_path, "data.json", content)
    assert read_all(path) == ([(1, {"a": 1}), (2, {"a": 2})], [expected_error])


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_a_utf16_file_is_one_error_not_one_per_line(tmp_path, name):
    path = write(tmp_path, name, (json.dumps(GOOD) + "\n").encode("utf-16") * 3)
    (error,) = list(iter_raw_rows(path))
    assert (error.row, error.field, error.reason) == (0, None, "invalid_utf8")
    assert "UTF-16" in error.message


def test_invalid_utf8_in_a_json_array_names_the_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(json_stream, "JSON_READ_BYTES", 4)
    path = write(tmp_path, "data.json", b'\xef\xbb\xbf[{"a": "\xc3\xa9\xff"}]')
    (error,) = error_items(path)
    assert (error.row, error.reason) == (1, "invalid_utf8")
    assert "byte offset 13 of the file" in error.message


# --- check_inputs ------------------------------------------------------------------------------


def test_check_inputs_accepts_readable_files(tmp_path):
    check_inputs([write(tmp_path, "a.jsonl", GOOD_LINE), str(write(tmp_path, "b.json", b"[]"))])


def test_check_inputs_names_every_bad_path_and_what_to_do(tmp_path):
    missing = tmp_path / "missing.jsonl"
    directory = tmp_path / "shards"
    directory.mkdir()
    with pytest.raises(InputError) as caught:
        check_inputs([write(tmp_path, "ok.jsonl", GOOD_LINE), missing, directory])
    message = str(caught.value)
    assert f"{missing}: no such file" in message
    assert f"{directory}: is a directory" in message and f"{directory}/*.jsonl" in message
    assert "ok.jsonl" not in message


def test_check_inputs_refuses_no_inputs_and_pipes(tmp_path):
    with pytest.raises(InputError, match="no input files"):
        check_inputs([])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        check_inputs([fifo])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_check_inputs_refuses_an_unreadable_file(tmp_path):
    path = write(tmp_path, "secret.jsonl", GOOD_LINE)
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        check_inputs([path])
