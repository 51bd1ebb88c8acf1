"""Token ids of many texts: exactly what `encode_batch(texts, add_special_tokens=False)` gives,
at less cost.

`prepare` spends most of its time here, so three kinds of work the tokenizer would do for
nothing are left out:

- offsets: `encode_batch_fast` returns the same ids without tracking where each token came
  from (masking finds token positions from the ids, see token_bytes.py);
- a Unicode normalization pass over text already in the normal form (see `IdsEncoder._encode_ids`);
- encoding the same opening again and again: chat templates put the same text before every
  conversation (Qwen's injected default system prompt, say); see `_shared_opening`.
"""

from __future__ import annotations

import os
import unicodedata

from tokenizers import Tokenizer

from megasft.data.token_bytes import NORMAL_FORMS

MIN_TEXTS_TO_SHARE = 8
"""Fewer texts than this are encoded whole: the opening would be encoded for little gain."""


class IdsEncoder:
    """`encoder(texts)` -> the ids of each text, as `tokenizer.encode_batch` gives them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._form = NORMAL_FORMS.get(type(tokenizer.normalizer))
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
        """A normalizer that only puts text in a Unicode normal form (Qwen2's NFC) leaves text
        already in that form as it is, and costs about a tenth of encoding on GSM8K. A batch
        whose texts are all in the form (ASCII text is, in every form) is encoded with the
        normalizer set aside for the call: added-token matching and pre-tokenization then see
        the same characters, so the ids are the same."""
        form = self._form
        if form is None or not all(
            text.isascii() or unicodedata.is_normalized(form, text) for text in texts
        ):
            return [e.ids for e in self._encode(texts, add_special_tokens=False)]
        normalizer = self.tokenizer.normalizer
        self.tokenizer.normalizer = None
        try:
            return [e.ids for e in self._encode(texts, add_special_tokens=False)]
        finally:
            self.tokenizer.normalizer = normalizer


MAX_ADDED_TOKENS_CHECKED = 1024
"""Above this many added tokens, `_boundary_tokens` does not compare them pair by pair."""


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
    contents = [token.content for token in added.values()]
    if len(contents) > MAX_ADDED_TOKENS_CHECKED or any(
        inner != outer and inner in outer for inner in contents for outer in contents
    ):
        return {}
    return {
        token.content: index
        for index, token in added.items()
        if token.content
        and not (token.normalized or token.lstrip or token.rstrip or token.single_word)
    }
