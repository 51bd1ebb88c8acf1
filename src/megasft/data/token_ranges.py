"""Trained token ranges from trained character spans, asked of a `tokenizers` encoding.

A token is a target iff its first character lies inside a trained span; a token that
straddles a span's edge is counted in the manifest's `boundary_tokens` (docs/prepare.md).
"""

from __future__ import annotations

import numpy as np

# Character -> token lookups go through the encoding (Rust, ~0.2 us each) instead of building
# the Python list of all offsets (~30 us for 200 tokens), which dominated masking time.


def first_token_at_or_after(encoding, span_start: int, span_end: int) -> tuple[int | None, bool]:
    """The first token whose first character is in [span_start, span_end), and whether the
    token covering `span_start` started before it (a straddling token, left untrained)."""
    for char in range(span_start, span_end):
        token = encoding.char_to_token(char)
        if token is None:
            continue  # a character no token covers (stripped whitespace, say)
        token_start = encoding.token_to_chars(token)[0]
        if token_start >= span_start:
            return token, False
        # The token covering the span's first characters began in the prompt.
        following = token + 1
        if following < len(encoding) and encoding.token_to_chars(following)[0] < span_end:
            return following, True
        return None, True
    return None, False


def last_token_before(encoding, span_start: int, span_end: int) -> tuple[int | None, bool]:
    """The last token whose first character is in [span_start, span_end), and whether it runs
    past `span_end` (a straddling token, trained)."""
    for char in range(span_end - 1, span_start - 1, -1):
        token = encoding.char_to_token(char)
        if token is None:
            continue
        # Byte-level tokens of one multi-byte character share its offsets; take the last.
        while token + 1 < len(encoding) and encoding.token_to_chars(token + 1)[0] <= char:
            token += 1
        token_start, token_end = encoding.token_to_chars(token)
        if token_start < span_start:
            return None, False  # the only token here straddles the start: nothing trained
        return token, token_end > span_end
    return None, False


def trained_token_ranges(
    encoding, spans: list[tuple[int, int]]
) -> tuple[list[tuple[int, int]], int]:
    """[(first, last)] trained tokens of each character span that has any, and how many
    tokens straddle a span's edge (see the module docstring)."""
    ranges = []
    boundary = 0
    tokens = len(encoding)
    for span_start, span_end in spans:
        # The usual case, asked of the encoding directly: a token starts at the span's start,
        # one ends at its end, and the next starts after it. Else the helpers below decide.
        first = encoding.char_to_token(span_start) if span_end > span_start else None
        last = encoding.char_to_token(span_end - 1) if first is not None else None
        if last is not None and first <= last:
            first_start = encoding.token_to_chars(first)[0]
            last_start, last_end = encoding.token_to_chars(last)
            if (
                first_start == span_start
                and last_start >= span_start
                and last_end == span_end
                and (last + 1 == tokens or encoding.token_to_chars(last + 1)[0] >= span_end)
            ):
                ranges.append((first, last))
                continue
        first, straddles_start = first_token_at_or_after(encoding, span_start, span_end)
        last, straddles_end = last_token_before(encoding, span_start, span_end)
        if first is None or last is None or last < first:
            continue
        ranges.append((first, last))
        boundary += straddles_start + straddles_end
    return ranges, boundary


def mask_of_ranges(tokens: int, firsts: np.ndarray, lasts: np.ndarray) -> np.ndarray:
    """[tokens] int8: 1 on every token of the inclusive ranges firsts[k]..lasts[k]."""
    change = np.zeros(tokens + 1, dtype=np.int64)
    np.add.at(change, firsts, 1)
    np.add.at(change, lasts + 1, -1)
    return (np.cumsum(change[:-1]) > 0).astype(np.int8)
