"""A JSON array decoded one element at a time, from a byte stream read in chunks.

`json.JSONDecoder.raw_decode` needs a whole value in one string; `JsonArrayScanner` grows its
buffer until the next value decodes, so memory grows with the largest element, not the file.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

JSON_READ_BYTES = 1 << 20
"""How much of a JSON array file is decoded at a time."""
_NON_SPACE = re.compile(r"[^ \t\r\n]")
"""JSON's own whitespace; anything else starts a value or is a syntax error."""
_JSON_DECODER = json.JSONDecoder()


class InvalidUtf8(Exception):
    """The stream is not UTF-8 from `offset` on."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset
        """Byte offset of the first invalid byte in the (decompressed) file."""


class JsonArrayScanner:
    """A cursor over text that arrives in chunks, decoding one JSON value at a time.

    `json.JSONDecoder.raw_decode` needs the whole value in one string, so when it fails the
    buffer is grown (at least doubled, to keep re-decoding linear overall) and the decode is
    retried; only at the end of the input is a failure a real syntax error.
    """

    def __init__(self, chunks: Iterator[str]):
        self.chunks = chunks
        self.text = ""
        self.pos = 0

    def next_char(self) -> str:
        """Skip whitespace; return the next character, or "" at the end of the input."""
        while True:
            match = _NON_SPACE.search(self.text, self.pos)
            if match:
                self.pos = match.start()
                return self.text[self.pos]
            self.pos = len(self.text)
            if not self._read_more(1):
                return ""

    def advance(self) -> None:
        self.pos += 1

    def decode_value(self) -> object:
        """Decode the value after any whitespace; JSONDecodeError if there is none."""
        # raw_decode does not skip leading whitespace itself.
        if self.next_char() == "":
            raise json.JSONDecodeError("Expecting value", self.text, self.pos)
        while True:
            try:
                value, end = _JSON_DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                if self._read_more(2 * (len(self.text) - self.pos) + 1):
                    continue
                raise
            # A number ending exactly at the buffer's end may go on in the next chunk.
            if (
                end == len(self.text)
                and not isinstance(value, dict | list | str)
                and self._read_more(1)
            ):
                continue
            self.pos = end
            return value

    def _read_more(self, wanted_chars: int) -> bool:
        """Append chunks until `wanted_chars` more are buffered; False at the end of input."""
        pieces = []
        wanted = wanted_chars
        while wanted > 0:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            pieces.append(chunk)
            wanted -= len(chunk)
        if not pieces:
            return False
        self.text = self.text[self.pos :] + "".join(pieces)
        self.pos = 0
        return True


def decode_utf8_chunks(stream: io.BufferedIOBase) -> Iterator[str]:
    """Decode a byte stream as strict UTF-8, one read at a time, dropping a leading BOM.

    Raises `InvalidUtf8` at the first invalid byte, after yielding the text before it, so
    that the elements before the bad byte are still read.
    """
    pending = b""
    offset = 0  # where `data` starts in the file
    at_start = True
    while chunk := stream.read(JSON_READ_BYTES):
        data = pending + chunk
        try:
            text = data.decode("utf-8")
            pending = b""
        except UnicodeDecodeError as error:
            if error.reason != "unexpected end of data" or error.end != len(data):
                yield data[: error.start].decode("utf-8").removeprefix("\ufeff")
                raise InvalidUtf8(offset + error.start) from None
            # A character split between two reads: keep its first bytes for the next one.
            text = data[: error.start].decode("utf-8")
            pending = data[error.start :]
        offset += len(data) - len(pending)
        if at_start and text:
            text = text.removeprefix("\ufeff")
            at_start = False
        yield text
    if pending:
        raise InvalidUtf8(offset)
