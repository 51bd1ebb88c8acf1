"""Where each token of a byte-level BPE encoding starts in its text, from the ids alone.

Masking needs to know where every token starts in the rendered text. `encode_batch` tracks
that for each token (character offsets through normalization and pre-tokenization), and the
bookkeeping is about a fifth of its time; `encode_batch_fast` returns the same ids without
it. With byte-level BPE (GPT-2, Llama 3, Qwen) every id stands for a fixed byte string, so a
token starts at the sum of the byte lengths of the tokens before it, provided those byte
strings, laid end to end, are exactly the text's UTF-8 bytes. `TokenBytes.spells` checks that
byte for byte for every text; a text whose tokens do not spell it out (a normalizer changed
it, a token is not byte-level, an added token stripped whitespace) is reported, and the
caller tokenizes it again with offsets.

Byte positions are character positions for ASCII text; for other text the caller converts.
"""

from __future__ import annotations

import re

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers

_IDENTITY_ON_NORMALIZED_TEXT = (
    normalizers.NFC,
    normalizers.NFD,
    normalizers.NFKC,
    normalizers.NFKD,
)
"""Normalizers that leave a text alone when it is already in their form, so that a text its
tokens spell out exactly was not changed by them, and its offsets are the byte positions."""


def _byte_level_alphabet() -> dict[int, int]:
    """Code point of each byte-level character -> the byte it stands for (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    alphabet = {byte: byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in alphabet:
            alphabet[byte] = 256 + shifted
            shifted += 1
    return {code_point: byte for byte, code_point in alphabet.items()}


_ALPHABET = _byte_level_alphabet()
_TO_LATIN1 = {code_point: chr(byte) for code_point, byte in _ALPHABET.items()}


class TokenBytes:
    """The byte string of each token id of one tokenizer, looked up as ids are first seen."""

    def __init__(self, tokenizer: Tokenizer):
        self._spellings = _Spellings(tokenizer)

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> TokenBytes | None:
        """None where ids cannot spell texts out: not byte-level BPE, or a normalizer that may
        change text (lowercasing, replacing) without changing it back."""
        normalizer = tokenizer.normalizer
        if normalizer is not None and not isinstance(normalizer, _IDENTITY_ON_NORMALIZED_TEXT):
            return None
        if not isinstance(tokenizer.model, models.BPE):
            return None
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            return None
        return cls(tokenizer)

    def spells(self, ids: list[int], text: bytes) -> bool:
        """Whether the tokens `ids`, laid end to end, are exactly `text` (its UTF-8 bytes)."""
        try:
            return b"".join(map(self._spellings.__getitem__, ids)) == text
        except TypeError:  # an id that stands for no fixed byte string (None)
            return False

    def lengths_of(self, ids: np.ndarray) -> np.ndarray:
        """[tokens] byte length of each id; meaningful for the ids of texts it `spells`."""
        return self._spellings.lengths_of(ids)


class _Spellings(dict):
    """Token id -> its bytes, or None where it stands for no fixed byte string; each id is
    looked up on first use (a run sees a small part of the vocabulary)."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.added = {
            index: token.content for index, token in tokenizer.get_added_tokens_decoder().items()
        }
        self.lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), np.int64)
        """[vocab] byte length of each id looked up so far."""

    def __missing__(self, index: int) -> bytes | None:
        spelling = self._bytes_of(index)
        if spelling == b"":  # two tokens at one position would make starts ambiguous
            spelling = None
        if spelling is not None:
            if index >= len(self.lengths):
                grown = np.zeros(max(index + 1, 2 * len(self.lengths)), np.int64)
                grown[: len(self.lengths)] = self.lengths
                self.lengths = grown
            self.lengths[index] = len(spelling)
        self[index] = spelling
        return spelling

    def lengths_of(self, ids: np.ndarray) -> np.ndarray:
        # Ids of texts that are not spelled may never have been looked up: clip, not fail.
        return np.take(self.lengths, ids, mode="clip")

    def _bytes_of(self, index: int) -> bytes | None:
        model_token = self.tokenizer.model.id_to_token(index)
        model_bytes = _byte_level_bytes(model_token) if model_token is not None else None
        if index in self.added:
            added_bytes = self.added[index].encode("utf-8")
            # Both the added token and the model's vocabulary may produce this id: only one
            # spelling is allowed.
            if model_token is not None and model_bytes != added_bytes:
                return None
            return added_bytes
        return model_bytes


_NOT_BYTE_LEVEL = re.compile("[^" + "".join(re.escape(chr(c)) for c in _ALPHABET) + "]")
"""Any character outside the byte-level alphabet."""


def _byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for; None if it has a character outside the
    byte-level alphabet (a vocabulary that is not byte-level, say)."""
    if _NOT_BYTE_LEVEL.search(token):
        return None
    return token.translate(_TO_LATIN1).encode("latin-1")
