"""Assistant-only loss masks from the conversation as the chat template renders it.

Each conversation is rendered once and tokenized once; the trained character spans of its
assistant turns (turn_spans.py) become trained tokens (token_ranges.py). Prompt and response
are never tokenized apart, and no `{% generation %}` markers are needed. `mask_many`, what
`prepare` uses, masks a whole batch with one encode call and numpy; `mask` does one
conversation and is the reference the batch path is tested against. docs/prepare.md, "How
masks are made", gives the method and the reasons.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import chain
from typing import NamedTuple

import numpy as np

from megasft.data.conversation import Message
from megasft.data.encode import ENCODER_CHOICES, IdsEncoder
from megasft.data.fast_bpe import FastBPE
from megasft.data.mask_types import (
    LOSS_ON_CHOICES,
    OVERLONG_CHOICES,
    MaskedBatch,
    MaskedExample,
    MaskingError,
    MaskPolicy,
    TemplateLayoutError,
)
from megasft.data.token_bytes import TokenBytes
from megasft.data.token_ranges import mask_of_ranges, trained_token_ranges
from megasft.data.tokenizer import ChatTokenizer
from megasft.data.turn_spans import TurnSpans

__all__ = [
    "LOSS_ON_CHOICES",
    "OVERLONG_CHOICES",
    "ConversationMasker",
    "MaskPolicy",
    "MaskedBatch",
    "MaskedExample",
    "MaskingError",
    "TemplateLayoutError",
]


class _Located(NamedTuple):
    """A batch of texts tokenized end to end, with the masks worked out where that could be
    done on the whole batch at once."""

    ids: np.ndarray
    """[tokens] int32, the texts' ids end to end."""
    bounds: np.ndarray
    """[texts + 1] int64: text r is ids[bounds[r]:bounds[r + 1]]."""
    mask: np.ndarray
    """[tokens] int8, aligned with ids; right for the texts that are `exact`."""
    boundary: np.ndarray
    """[texts] int64: straddling tokens of each exact text."""
    trained: np.ndarray
    """[texts] bool: whether an exact text has any trained token."""
    exact: np.ndarray
    """[texts] bool: False for a text whose mask must be worked out alone (`_masked`)."""


class ConversationMasker:
    """Renders, tokenizes and masks conversations for one tokenizer and policy."""

    def __init__(self, chat_tokenizer: ChatTokenizer, policy: MaskPolicy, encoder: str = "auto"):
        """
        Args:
            chat_tokenizer: the tokenizer and its chat template.
            policy: which turns and tokens are trained.
            encoder: "auto" encodes with tiktoken's BPE core where it reproduces the
                tokenizer (see fast_bpe.py), "tokenizers" always with the tokenizer.

        Raises:
            ValueError: for an unknown `encoder`.
        """
        if encoder not in ENCODER_CHOICES:
            raise ValueError(f"encoder must be one of {ENCODER_CHOICES}, got {encoder!r}")
        self.chat_tokenizer = chat_tokenizer
        self.template = chat_tokenizer.template
        self.tokenizer = chat_tokenizer.tokenizer
        self.policy = policy
        self.turns = TurnSpans(chat_tokenizer, policy)
        self._prefix_ids = list(chat_tokenizer.prefix_ids)
        self._prefix_text = self.tokenizer.decode(self._prefix_ids, skip_special_tokens=False)
        # Ids without offsets, positions from the tokens' bytes (see token_bytes.py), where the
        # tokenizer allows it; else `encode_batch` with offsets.
        self._token_bytes = TokenBytes.for_tokenizer(self.tokenizer)
        fast = chat_tokenizer.fast_bpe() if encoder == "auto" else None
        self._encode_ids = IdsEncoder(self.tokenizer, fast if isinstance(fast, FastBPE) else None)

    @property
    def tiktoken_given_up(self) -> bool:
        """Whether tiktoken's BPE was to encode and has been given up (it differed once)."""
        return self._encode_ids.fast_given_up

    def mask(
        self,
        messages: list[Message] | tuple[Message, ...],
        max_length: int | None = None,
        overlong: str = "drop",
        tools: list[dict] | None = None,
    ) -> MaskedExample:
        """Tokenizes and masks one conversation.

        Args:
            messages: the conversation.
            max_length: the most tokens it may take, or None for no limit.
            overlong: "drop" rejects a longer one; "truncate-oldest" drops its oldest
                exchanges until it fits.
            tools: the conversation's tool definitions (`Conversation.tools`), or None.

        Returns:
            The example; `dropped_turns` counts the messages truncation removed.

        Raises:
            MaskingError: for a conversation to reject, its reason a manifest reason code.
        """
        messages = list(messages)
        dropped = 0
        while True:
            example = self._mask_once(messages, tools)
            if max_length is None or len(example.input_ids) <= max_length:
                break
            shorter = _drop_oldest_turn(messages) if overlong == "truncate-oldest" else None
            if shorter is None:
                raise MaskingError(
                    "too_long",
                    f"{len(example.input_ids)} tokens, above --seq-length {max_length}"
                    + (
                        " even with only the final exchange kept"
                        if overlong == "truncate-oldest"
                        else " (use --overlong truncate-oldest to drop the oldest turns)"
                    ),
                )
            dropped += len(messages) - len(shorter)
            messages = shorter
        if dropped:
            example = MaskedExample(
                example.input_ids, example.loss_mask, example.boundary_tokens, dropped
            )
        return example

    def mask_many(
        self,
        conversations: list[list[Message]],
        max_length: int | None = None,
        overlong: str = "drop",
        tools: list[list[dict] | None] | None = None,
    ) -> MaskedBatch:
        """`mask` for many conversations, the examples laid end to end in flat arrays.

        The fast path: one encode call for all of them, and the masks worked out with numpy
        over the whole batch (`_mask_rendered`); it gives exactly what `mask` gives.

        Args:
            conversations: the conversations, in order.
            max_length: as for `mask`.
            overlong: as for `mask`.
            tools: each conversation's tool definitions, or None when none has any.

        Returns:
            The batch; `outcomes` holds, per conversation, its example's index or the
            MaskingError that rejects it.
        """
        outcomes: list[int | MaskingError] = []
        positions, texts, spans = [], [], []
        for position, messages in enumerate(conversations):
            try:
                row_tools = None if tools is None else tools[position]
                text, text_spans = self._render_and_locate(list(messages), row_tools)
            except MaskingError as error:
                outcomes.append(error)
                continue
            outcomes.append(-1)
            positions.append(position)
            texts.append(text)
            spans.append(text_spans)
        batch = self._mask_rendered(texts, spans)
        if max_length is not None and (np.diff(batch.offsets) > max_length).any():
            # Rare: redo those rows one by one, which knows how to truncate or reject.
            examples: list[MaskedExample | MaskingError] = []
            for position, outcome in zip(positions, batch.outcomes, strict=True):
                example = outcome if isinstance(outcome, MaskingError) else batch.example(outcome)
                if isinstance(example, MaskedExample) and len(example.input_ids) > max_length:
                    try:
                        example = self.mask(
                            conversations[position],
                            max_length,
                            overlong,
                            None if tools is None else tools[position],
                        )
                    except MaskingError as error:
                        example = error
                examples.append(example)
            batch = _gathered(examples)
        for position, outcome in zip(positions, batch.outcomes, strict=True):
            outcomes[position] = outcome
        return replace(batch, outcomes=outcomes)

    def _mask_once(self, messages: list[Message], tools: list[dict] | None) -> MaskedExample:
        text, spans = self._render_and_locate(messages, tools)
        return self._masked(text, spans, self.tokenizer.encode(text, add_special_tokens=False))

    def _render_and_locate(
        self, messages: list[Message], tools: list[dict] | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        text = self.turns.render(messages, add_generation_prompt=False, tools=tools)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                # JSON escapes can smuggle in lone surrogates, which no tokenizer accepts.
                raise MaskingError(
                    "invalid_utf8",
                    f"the text holds a lone surrogate ({error.object[error.start]!r} at "
                    f"character {error.start}), which is not valid Unicode",
                ) from None
        spans = self.turns.char_spans(messages, text, tools)
        if not spans:
            raise MaskingError(
                "no_trained_tokens",
                "no assistant turn is trained (all are flagged train: false, or the last one "
                "is under --loss-on last-assistant); the row would add nothing to the loss",
            )
        return text, spans

    def _masked(self, text: str, spans: list[tuple[int, int]], encoding) -> MaskedExample:
        """One text's example from its encoding (with offsets): the reference way."""
        ranges, boundary = trained_token_ranges(encoding, spans)
        if not ranges:
            raise _no_trained_tokens()
        ids = np.asarray(encoding.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=np.int8)
        for first, last in ranges:
            mask[first : last + 1] = 1
        return self._example(ids, mask, self._lacks_prefix(text), boundary)

    def _mask_rendered(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> MaskedBatch:
        """Tokenizes rendered texts in one batch and masks their trained character spans:
        exactly what `_masked` gives for each text, with the work done on the whole batch
        where the tokenizer allows it."""
        if self._token_bytes is None:
            located = self._locate_with_offsets(texts, spans)
        else:
            located = self._locate_with_token_bytes(texts, spans)
        ids, bounds, mask, boundary, trained, exact = located
        prefixed = self._lacking_prefix(texts)
        if exact.all() and trained.all() and not prefixed.any():
            return _whole_batch(ids, mask, bounds, boundary)
        results: list[MaskedExample | MaskingError] = []
        for row, text in enumerate(texts):
            if not exact[row]:
                try:
                    encoding = self.tokenizer.encode(text, add_special_tokens=False)
                    results.append(self._masked(text, spans[row], encoding))
                except MaskingError as error:
                    results.append(error)
            elif not trained[row]:
                results.append(_no_trained_tokens())
            else:
                rows = slice(bounds[row], bounds[row + 1])
                example = self._example(ids[rows], mask[rows], prefixed[row], int(boundary[row]))
                results.append(example)
        return _gathered(results)

    def _locate_with_token_bytes(
        self, texts: list[str], spans: list[list[tuple[int, int]]]
    ) -> _Located:
        """Ids without per-token offsets: exact where the ids spell the text out
        (`TokenBytes.locate`) and every span edge falls between two tokens, so that the token
        starting at a span's start is its first trained token, the one ending at its end its
        last, and no token straddles an edge."""
        id_lists = self._encode_ids(texts)
        counts = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=int(counts.sum()))
        encoded = [text.encode("utf-8") for text in texts]
        lengths, spelled = self._token_bytes.locate(ids, counts, encoded)  # [tokens], [texts]
        ends = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ends[1:])
        bounds = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        starts = ends[:-1] - np.repeat(ends[bounds[:-1]], counts)  # [tokens], in its own text

        # Every span, in bytes from the start of the whole batch of texts.
        text_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([len(text) for text in encoded], out=text_offsets[1:])
        span_rows, span_starts, span_ends = [], [], []
        for row, (text, text_spans) in enumerate(zip(texts, spans, strict=True)):
            is_ascii = len(encoded[row]) == len(text)
            for start, end in text_spans:
                if end <= start:
                    continue  # no characters, no tokens: `_masked` skips it too
                if not is_ascii:
                    start, end = len(text[:start].encode()), len(text[:end].encode())
                span_rows.append(row)
                span_starts.append(start)
                span_ends.append(end)
        span_rows = np.asarray(span_rows, dtype=np.int64)
        span_starts = np.asarray(span_starts, dtype=np.int64) + text_offsets[span_rows]
        span_ends = np.asarray(span_ends, dtype=np.int64) + text_offsets[span_rows]

        # Token starts and ends of the spelled texts, in the same coordinates: increasing,
        # since each text's tokens tile its own stretch of bytes.
        kept = np.repeat(spelled, counts)
        token_index = np.flatnonzero(kept)
        token_starts = (starts + np.repeat(text_offsets[:-1], counts))[kept]
        token_ends = token_starts + lengths[kept]
        first = np.searchsorted(token_starts, span_starts)
        last = np.searchsorted(token_ends, span_ends)
        on_edges = spelled[span_rows] & (first < len(token_starts)) & (last < len(token_ends))
        on_edges[on_edges] &= (token_starts[first[on_edges]] == span_starts[on_edges]) & (
            token_ends[last[on_edges]] == span_ends[on_edges]
        )
        fast = spelled.copy()
        fast[span_rows[~on_edges]] = False  # a span edge inside a token: `_masked` decides

        first = token_index[first[on_edges]]
        last = token_index[last[on_edges]]
        mask = mask_of_ranges(len(ids), first, last)
        trained = np.bincount(span_rows[on_edges], weights=last + 1 - first, minlength=len(texts))
        # No token straddles an edge of an exact text's spans.
        boundary = np.zeros(len(texts), np.int64)
        return _Located(ids, bounds, mask, boundary, trained > 0, fast)

    def _locate_with_offsets(
        self, texts: list[str], spans: list[list[tuple[int, int]]]
    ) -> _Located:
        """For a tokenizer whose ids cannot give token positions: with the encodings' offsets,
        exact for every text, the masks set with numpy, not one small array per text."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        id_lists = [encoding.ids for encoding in encodings]
        counts = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=int(counts.sum()))
        bounds = np.zeros(len(texts) + 1, dtype=np.int64)  # text r is ids[bounds[r]:bounds[r + 1]]
        np.cumsum(counts, out=bounds[1:])

        firsts, lasts = [], []  # of every trained range, in `ids`
        boundary = np.zeros(len(texts), dtype=np.int64)
        trained = np.zeros(len(texts), dtype=bool)
        for row, (encoding, text_spans, base) in enumerate(
            zip(encodings, spans, bounds[:-1].tolist(), strict=True)
        ):
            ranges, boundary[row] = trained_token_ranges(encoding, text_spans)
            trained[row] = bool(ranges)
            for first, last in ranges:
                firsts.append(base + first)
                lasts.append(base + last)
        mask = mask_of_ranges(
            len(ids), np.asarray(firsts, dtype=np.int64), np.asarray(lasts, dtype=np.int64)
        )
        return _Located(ids, bounds, mask, boundary, trained, np.ones(len(texts), dtype=bool))

    def _lacking_prefix(self, texts: list[str]) -> np.ndarray:
        """[texts] bool: which texts need the tokenizer's own prefix (a BOS) put before them,
        because the template did not already start them with it."""
        if not self._prefix_ids:
            return np.zeros(len(texts), dtype=bool)
        return np.fromiter(
            (not text.startswith(self._prefix_text) for text in texts),
            dtype=bool,
            count=len(texts),
        )

    def _lacks_prefix(self, text: str) -> bool:
        """Whether `text` needs the tokenizer's own prefix put before it (see above)."""
        return bool(self._prefix_ids) and not text.startswith(self._prefix_text)

    def _example(
        self, ids: np.ndarray, mask: np.ndarray, prefixed: bool, boundary: int
    ) -> MaskedExample:
        """One text's example from its stretch of a batch's arrays, its prefix put before it
        (untrained) where it lacks one."""
        if prefixed:
            ids = np.concatenate([np.asarray(self._prefix_ids, np.int32), ids])
            mask = np.concatenate([np.zeros(len(self._prefix_ids), np.int8), mask])
        return MaskedExample(ids, mask, boundary)


def _drop_oldest_turn(messages: list[Message]) -> list[Message] | None:
    """Removes the oldest exchange after any leading system messages, keeping the final answer.

    An exchange runs from the first non-system message up to the next user message. Returns
    None when nothing more can go (only one exchange left).
    """
    first = 0
    while first < len(messages) and messages[first].role == "system":
        first += 1
    following_user = next(
        (j for j in range(first + 1, len(messages)) if messages[j].role == "user"), None
    )
    if following_user is None:
        return None
    shorter = messages[:first] + messages[following_user:]
    if not any(m.role == "assistant" for m in shorter):
        return None
    return shorter


def _whole_batch(
    ids: np.ndarray, mask: np.ndarray, bounds: np.ndarray, boundary: np.ndarray
) -> MaskedBatch:
    """Every text as it lies in the arrays, none dropped: the usual case, no per-text work."""
    count = len(bounds) - 1
    return MaskedBatch(ids, mask, bounds, boundary, np.zeros(count, np.int64), list(range(count)))


def _no_trained_tokens() -> MaskingError:
    return MaskingError(
        "no_trained_tokens", "the trained turns produced no tokens after tokenization"
    )


def _gathered(examples: list[MaskedExample | MaskingError]) -> MaskedBatch:
    """The examples end to end in one MaskedBatch, the errors kept in place."""
    outcomes: list[int | MaskingError] = []
    kept: list[MaskedExample] = []
    for example in examples:
        if isinstance(example, MaskingError):
            outcomes.append(example)
        else:
            outcomes.append(len(kept))
            kept.append(example)
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum([len(example.input_ids) for example in kept], out=offsets[1:])
    return MaskedBatch(
        np.concatenate([np.zeros(0, np.int32), *(e.input_ids for e in kept)], dtype=np.int32),
        np.concatenate([np.zeros(0, np.int8), *(e.loss_mask for e in kept)], dtype=np.int8),
        offsets,
        np.asarray([e.boundary_tokens for e in kept], dtype=np.int64),
        np.asarray([e.dropped_turns for e in kept], dtype=np.int64),
        outcomes,
    )
