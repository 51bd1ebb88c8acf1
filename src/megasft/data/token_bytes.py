"""Where each token of a byte-level BPE encoding starts in its text, from the ids alone.

With byte-level BPE every id stands for a fixed byte string, so a token starts at the sum of
the byte lengths of the tokens before it, provided those strings spell the text's UTF-8 bytes
exactly; `TokenBytes.locate` checks that for every text and reports those it cannot place, for
the caller to tokenize again with offsets. Byte positions are character positions for ASCII
text; for other text the caller converts. See docs/prepare.md, "Encoding fast".
"""

from __future__ import annotations

import re

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers

_UNSEEN = -2
"""Length of an id not looked up yet."""
_NO_FIXED_BYTES = -1
"""Length of an id that stands for no fixed byte string: texts holding it are not spelled."""

NORMAL_FORMS = {
    normalizers.NFC: "NFC",
    normalizers.NFD: "NFD",
    normalizers.NFKC: "NFKC",
    normalizers.NFKD: "NFKD",
}
"""Normalizers that leave a text alone when it is already in their form, so that a text its
tokens spell out exactly was not changed by them, and its offsets are the byte positions."""
_IDENTITY_ON_NORMALIZED_TEXT = tuple(NORMAL_FORMS)


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
    """The byte string of each token id of one tokenizer, looked up as ids are first seen (a
    run sees a small part of the vocabulary)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._added = {
            index: token.content for index, token in tokenizer.get_added_tokens_decoder().items()
        }
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._lengths = np.full(size, _UNSEEN, dtype=np.int64)
        """[vocab] byte length of each id, or _UNSEEN, or _NO_FIXED_BYTES."""
        self._starts = np.zeros(size, dtype=np.int64)
        """[vocab] where each id's bytes start in `_bytes`."""
        self._bytes = np.zeros(0, dtype=np.uint8)
        """The bytes of every id looked up so far, end to end."""

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> TokenBytes | None:
        """The token bytes of `tokenizer`, where its ids can spell texts out.

        Args:
            tokenizer: a `tokenizers.Tokenizer`.

        Returns:
            None where ids cannot spell texts out: not byte-level BPE, or a normalizer that may
            change text (lowercasing, replacing) without changing it back.
        """
        normalizer = tokenizer.normalizer
        if normalizer is not None and not isinstance(normalizer, _IDENTITY_ON_NORMALIZED_TEXT):
            return None
        if not isinstance(tokenizer.model, models.BPE):
            return None
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            return None
        return cls(tokenizer)

    def locate(
        self, ids: np.ndarray, counts: np.ndarray, texts: list[bytes]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The byte length of every token of many texts, and which texts their tokens spell.

        Args:
            ids: [tokens] the tokens of all texts end to end.
            counts: [texts] `counts[r]` of them belong to `texts[r]`.
            texts: each text's UTF-8 bytes.

        Returns:
            `(lengths, spelled)`: `lengths[j]` is the byte length of token j, and `spelled[r]`
            says whether the tokens of text r, laid end to end, are its bytes exactly; only then
            do its tokens' lengths give where they start.
        """
        self._look_up(ids)
        lengths = self._lengths[ids]  # [tokens], negative for an id with no fixed bytes
        ends = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.maximum(lengths, 0), out=ends[1:])
        unfixed = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths < 0, out=unfixed[1:])
        first = np.zeros(len(texts) + 1, dtype=np.int64)  # [texts + 1] first token of each
        np.cumsum(counts, out=first[1:])
        text_lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        spelled = (ends[first[1:]] - ends[first[:-1]] == text_lengths) & (
            unfixed[first[1:]] == unfixed[first[:-1]]
        )

        # Byte for byte, over the texts whose lengths agree.
        kept = np.repeat(spelled, counts)
        kept_ids = ids[kept]
        kept_lengths = lengths[kept]
        kept_ends = np.cumsum(kept_lengths)
        total = int(kept_ends[-1]) if len(kept_ends) else 0
        # Byte k of the kept tokens' bytes, end to end, is at this position of `_bytes`.
        positions = np.repeat(
            self._starts[kept_ids] - (kept_ends - kept_lengths), kept_lengths
        ) + np.arange(total, dtype=np.int64)
        written = b"".join(text for text, keep in zip(texts, spelled.tolist(), strict=True) if keep)
        differ = np.flatnonzero(self._bytes[positions] != np.frombuffer(written, np.uint8))
        if len(differ):
            kept_texts = np.flatnonzero(spelled)
            spelled[
                kept_texts[np.searchsorted(np.cumsum(text_lengths[kept_texts]), differ, "right")]
            ] = False
        return lengths, spelled

    def _look_up(self, ids: np.ndarray) -> None:
        if len(ids) and int(ids.max()) >= len(self._lengths):
            grow = int(ids.max()) + 1 - len(self._lengths)
            self._lengths = np.concatenate([self._lengths, np.full(grow, _UNSEEN, np.int64)])
            self._starts = np.concatenate([self._starts, np.zeros(grow, np.int64)])
        unseen = np.unique(ids[self._lengths[ids] == _UNSEEN])
        if not len(unseen):
            return
        spellings = []
        offset = len(self._bytes)
        for index in unseen.tolist():
            spelling = self._bytes_of(index)
            if not spelling:  # none, or empty: two tokens at one position would be ambiguous
                self._lengths[index] = _NO_FIXED_BYTES
                continue
            self._lengths[index] = len(spelling)
            self._starts[index] = offset
            offset += len(spelling)
            spellings.append(spelling)
        self._bytes = np.concatenate([self._bytes, np.frombuffer(b"".join(spellings), np.uint8)])

    def _bytes_of(self, index: int) -> bytes | None:
        model_token = self.tokenizer.model.id_to_token(index)
        model_bytes = _byte_level_bytes(model_token) if model_token is not None else None
        if index in self._added:
            added_bytes = self._added[index].encode("utf-8")
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


def byte_level_vocabulary(vocab: dict[str, int]) -> dict[bytes, int] | None:
    """The bytes each token of a byte-level vocabulary stands for -> its id.

    Args:
        vocab: token (in the byte-level alphabet) -> id.

    Returns:
        Bytes -> id; None if some token has a character outside the byte-level alphabet.
    """
    tokens = "".join(vocab)
    if _NOT_BYTE_LEVEL.search(tokens):
        return None
    # One translation of all tokens end to end, then cut: each character is one byte.
    spelled = tokens.translate(_TO_LATIN1).encode("latin-1")
    ends = np.cumsum(np.fromiter(map(len, vocab), dtype=np.int64, count=len(vocab))).tolist()
    starts = [0, *ends[:-1]]
    return {
        spelled[start:end]: index
        for start, end, index in zip(starts, ends, vocab.values(), strict=True)
    }
