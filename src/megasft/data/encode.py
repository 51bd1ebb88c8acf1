"""Token ids of many texts: exactly what `encode_batch(texts, add_special_tokens=False)` gives,
at less cost.

`prepare` spends most of its time here: tiktoken's BPE core (fast_bpe.py) encodes where it
reproduces the tokenizer, otherwise the tokenizer does, without offsets, redundant
normalization or re-encoding the shared opening of every conversation. See docs/prepare.md,
"Encoding fast".
"""

from __future__ import annotations

import logging
import os
import unicodedata

from tokenizers import Tokenizer

from megasft.data.fast_bpe import FastBPE, may_hold_one_another
from megasft.data.token_bytes import NORMAL_FORMS

logger = logging.getLogger(__name__)

ENCODER_CHOICES = ("auto", "tokenizers")
"""auto: tiktoken's BPE core where it reproduces the tokenizer; tokenizers: never."""

MIN_TEXTS_TO_SHARE = 8
"""Fewer texts than this are encoded whole: the opening would be encoded for little gain."""


class IdsEncoder:
    """`encoder(texts)` -> the ids of each text, as `tokenizer.encode_batch` gives them.

    With `fast` (tiktoken's BPE core for this tokenizer, see fast_bpe.py), the texts the
    normalizer leaves alone are encoded by it instead. The longest of them in every call is
    also encoded by the tokenizer, and at the first difference `fast` is given up for good.
    """

    def __init__(self, tokenizer: Tokenizer, fast: FastBPE | None = None):
        self.tokenizer = tokenizer
        self.fast = fast
        self.fast_given_up = False
        """Whether `fast` differed from the tokenizer once and was dropped."""
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        normalizer = tokenizer.normalizer
        self._form = NORMAL_FORMS.get(type(normalizer))
        self._normalizes = normalizer is not None
        """Whether there is a normalizer; only one putting text in `_form` can be set aside."""
        self._boundaries = _boundary_tokens(tokenizer)
        """Added tokens after which a text can be cut and its two parts encoded apart."""

    def __call__(self, texts: list[str]) -> list[list[int]]:
        opening, boundary = self._shared_opening(texts)
        if not opening:
            return self._encode_ids(texts)
        # The opening once, and the first text whole as well, to check the cut on it.
        cut = len(opening)
        head, first, *rests = self._encode_ids([opening, texts[0], *(t[cut:] for t in texts)])
        if head[-1:] != [boundary] or first != head + rests[0]:
            self._boundaries = {}  # the cut does not hold for this tokenizer: never again
            return self._encode_ids(texts)
        return [head + rest for rest in rests]

    def _shared_opening(self, texts: list[str]) -> tuple[str, int | None]:
        """The longest start of every text that ends with a boundary token, and that token's
        id; ("", None) where there is none.

        A tokenizer first splits a text at its added tokens, then normalizes, pre-tokenizes
        and encodes each piece on its own. So a text cut right after an added token encodes,
        part by part, to the ids of the whole, as long as the token is matched there in the
        whole text as it is in the opening alone (see `_boundary_tokens`).
        """
        if not self._boundaries or len(texts) < MIN_TEXTS_TO_SHARE:
            return "", None
        common = os.path.commonprefix(texts)
        end, boundary = 0, None
        for token, index in self._boundaries.items():
            at = common.rfind(token)
            if at >= 0 and at + len(token) > end:
                end, boundary = at + len(token), index
        return common[:end], boundary

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Texts the normalizer leaves as they are go to `_encode_as_is`, the rest to the
        tokenizer as it is; the ids come back in the order of `texts`."""
        as_is = self._left_alone(texts)
        if all(as_is):
            return self._encode_as_is(texts)
        if not any(as_is):
            return self._tokenizer_ids(texts)
        plain = iter(
            self._encode_as_is([t for t, alone in zip(texts, as_is, strict=True) if alone])
        )
        other = iter(
            self._tokenizer_ids([t for t, alone in zip(texts, as_is, strict=True) if not alone])
        )
        return [next(plain) if alone else next(other) for alone in as_is]

    def _left_alone(self, texts: list[str]) -> list[bool]:
        """Which texts are valid UTF-8 that the normalizer would not change.

        A normalizer that only puts text in a Unicode normal form (Qwen2's NFC) leaves text
        already in that form as it is (ASCII is, in every form), and costs about a tenth of
        encoding on GSM8K. With it set aside, added-token matching and pre-tokenization see
        the same characters, so the ids are the same.
        """
        if self._normalizes and self._form is None:
            return [False] * len(texts)
        return [
            text.isascii()
            or (
                _is_utf8(text)
                and (self._form is None or unicodedata.is_normalized(self._form, text))
            )
            for text in texts
        ]

    def _encode_as_is(self, texts: list[str]) -> list[list[int]]:
        fast = self.fast
        if fast is None or not texts:
            return self._encode_unnormalized(texts)
        ids = fast.encode(texts)
        # Texts tiktoken gave up on (see FastBPE.encode) are the tokenizer's to encode.
        given_up = [i for i, text_ids in enumerate(ids) if text_ids is None]
        if given_up:
            redone = self._encode_unnormalized([texts[i] for i in given_up])
            for i, text_ids in zip(given_up, redone, strict=True):
                ids[i] = text_ids
        skipped = set(given_up)
        encoded = [i for i in range(len(texts)) if i not in skipped]
        if not encoded:
            return ids
        # The longest text tiktoken encoded (it has the most to differ on), by the tokenizer.
        probe = max(encoded, key=lambda i: len(texts[i]))
        if self._encode_unnormalized([texts[probe]]) == ids[probe : probe + 1]:
            return ids
        self.fast, self.fast_given_up = None, True
        logger.warning(
            "tiktoken's BPE gave other ids than the tokenizer for %r; encoding with the "
            "tokenizer from now on",
            texts[probe][:200],
        )
        return self._encode_unnormalized(texts)

    def _encode_unnormalized(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer's ids for texts its normalizer would leave as they are, with the
        normalizer set aside for the call."""
        if not self._normalizes:
            return self._tokenizer_ids(texts)
        normalizer = self.tokenizer.normalizer
        self.tokenizer.normalizer = None
        try:
            return self._tokenizer_ids(texts)
        finally:
            self.tokenizer.normalizer = normalizer

    def _tokenizer_ids(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer's ids, normalizer and all."""
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]


def _is_utf8(text: str) -> bool:
    """False for a str holding lone surrogates, which no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _boundary_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """The added tokens a text can be cut after (content -> id); {} where none can.

    The token must be matched on the raw text (not normalized) and must neither strip the
    whitespace around it nor need a word boundary, or the characters after the cut would
    decide whether it matches. And no added token may hold another inside it: in the whole
    text, a longer token could then be matched across the cut. A tokenizer where the cut
    still does not hold (a pre-tokenizer that treats the first piece of a text apart, say)
    is caught by the check in `IdsEncoder.__call__`.
    """
    added = tokenizer.get_added_tokens_decoder()
    if may_hold_one_another([token.content for token in added.values()]):
        return {}
    return {
        token.content: index
        for index, token in added.items()
        if token.content
        and not (token.normalized or token.lstrip or token.rstrip or token.single_word)
    }
