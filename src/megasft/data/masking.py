"""Assistant-only loss masks from the conversation as the chat template renders it.

The method, for each assistant turn `i` that is trained:

1. Render the whole conversation once and tokenize it once, with character offsets.
2. The turn's output is what a model has to generate after being prompted the way it will be
   prompted at inference: the text between the end of `render(messages[:i],
   add_generation_prompt=True)` and the end of `render(messages[:i + 1])`. Both renderings
   must be prefixes of the full rendering; a template that re-renders earlier turns (say, one
   that drops the reasoning of earlier answers) breaks that, and such a turn is rejected with
   `template_not_prefix_stable` instead of being mis-masked.
3. Trailing whitespace after the turn's last special token (`<|im_end|>` + "\\n") is not
   trained; that special token is the end-of-turn token, trained unless `train_on_eos=False`.
4. A token is a target iff its first character lies inside a trained character span. A token
   that straddles the start of a span (its first characters belong to the prompt) is therefore
   not trained, and one that starts inside a span and runs past its end is; both are counted as
   `boundary_tokens` in the manifest. With real templates, role headers and end-of-turn tokens
   are special tokens, so straddling happens only with unusual templates.

No `{% generation %}` markers are needed, and prompt and response are never tokenized apart.

Rendering prefixes costs two extra renders per trained turn. The fast path avoids them: the
template is rendered once per sequence of roles with placeholder contents (a "skeleton"),
which gives where every message's content and every turn boundary lands. When the skeleton
with the real contents put back equals the real rendering, those positions are exact for
this conversation; otherwise (a template that transforms contents) we fall back to the
prefix renders above.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from dataclasses import dataclass, replace
from itertools import accumulate, chain

import numpy as np

from megasft.data.conversation import Message
from megasft.data.encode import ENCODER_CHOICES, IdsEncoder
from megasft.data.fast_bpe import FastBPE
from megasft.data.template import TemplateError
from megasft.data.token_bytes import TokenBytes
from megasft.data.tokenizer import ChatTokenizer
from megasft.errors import ConfigError

_UNBUILT = object()
"""A sequence of roles whose skeleton has not been built yet (None: none can be)."""

LOSS_ON_CHOICES = ("all-assistant", "last-assistant")
OVERLONG_CHOICES = ("drop", "truncate-oldest")


@dataclass(frozen=True)
class MaskPolicy:
    loss_on: str = "all-assistant"
    """Which assistant turns are trained: all of them, or only the last one."""
    train_on_eos: bool = True
    """Whether the end-of-turn token after each trained answer is a target."""

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON_CHOICES:
            raise ConfigError(f"--loss-on must be one of {', '.join(LOSS_ON_CHOICES)}")


class MaskingError(Exception):
    """This conversation cannot be masked; `reason` is a manifest reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Exceptions pickle through `args`, which holds only the message; worker processes send
        # these back inside a MaskedBatch.
        return (MaskingError, (self.reason, self.message))


class TemplateLayoutError(ConfigError):
    """The template cannot be masked at all (a problem with the template, not with a row)."""


@dataclass(frozen=True, slots=True)
class MaskedExample:
    input_ids: np.ndarray
    """[n] int32 token ids of the rendered conversation."""
    loss_mask: np.ndarray
    """[n] int8; loss_mask[i] == 1 iff token i is a training target (unshifted)."""
    boundary_tokens: int
    """Tokens that straddle the edge of a trained span (see the module docstring)."""
    dropped_turns: int = 0
    """Messages removed from the start by `truncate-oldest`."""


@dataclass(frozen=True, slots=True)
class MaskedBatch:
    """The masked examples of many conversations, laid end to end (what `prepare` writes)."""

    input_ids: np.ndarray
    """[tokens] int32; example k is input_ids[offsets[k]:offsets[k + 1]]."""
    loss_mask: np.ndarray
    """[tokens] int8, aligned with input_ids."""
    offsets: np.ndarray
    """[examples + 1] int64."""
    boundary_tokens: np.ndarray
    """[examples] int64, as in MaskedExample."""
    dropped_turns: np.ndarray
    """[examples] int64, as in MaskedExample."""
    outcomes: list[int | MaskingError]
    """One per conversation, in order: the index of its example, or why it was rejected."""

    def example(self, index: int) -> MaskedExample:
        start, end = self.offsets[index], self.offsets[index + 1]
        return MaskedExample(
            self.input_ids[start:end],
            self.loss_mask[start:end],
            int(self.boundary_tokens[index]),
            int(self.dropped_turns[index]),
        )


@dataclass(frozen=True, slots=True)
class _Skeleton:
    """The rendering of one sequence of roles with placeholder contents."""

    pieces: tuple[str, ...]
    """Template text between contents: pieces[0] + content[order[0]] + pieces[1] + ..."""
    order: tuple[int, ...]
    """Message index of each content slot, in text order."""
    placeholder_lengths: tuple[int, ...]
    """Length of the placeholder in each slot, in text order."""
    turns: dict[int, tuple[bool, int, int, int, int]]
    """Assistant index -> (ends_in_special, start, slots_before_start, end, slots_before_end),
    positions in the skeleton, each with the number of content slots before it (a real
    position is the skeleton one plus the growth of those slots). With ends_in_special,
    [start, end) is the trained span; else it is (generation prompt end, turn end), and where
    the span ends depends on the real content's trailing whitespace, worked out on the real
    text."""


def _placeholder(index: int) -> str:
    # Private-use code points: never in real text, untouched by `trim` and friends.
    return f"\ue000{index}\ue001"


class ConversationMasker:
    """Renders, tokenizes and masks conversations for one tokenizer and policy.

    Holds a per-process cache of skeletons keyed by the sequence of roles.
    """

    def __init__(self, chat_tokenizer: ChatTokenizer, policy: MaskPolicy, encoder: str = "auto"):
        """`encoder`: "auto" encodes with tiktoken's BPE core where it reproduces the
        tokenizer (see fast_bpe.py), "tokenizers" always with the tokenizer."""
        if encoder not in ENCODER_CHOICES:
            raise ValueError(f"encoder must be one of {ENCODER_CHOICES}, got {encoder!r}")
        self.chat_tokenizer = chat_tokenizer
        self.template = chat_tokenizer.template
        self.tokenizer = chat_tokenizer.tokenizer
        self.policy = policy
        # Longest first, so that "</s>" is not matched inside a longer special token's text.
        self._special_texts = tuple(
            sorted(chat_tokenizer.special_token_texts, key=len, reverse=True)
        )
        self._prefix_ids = list(chat_tokenizer.prefix_ids)
        self._prefix_text = self.tokenizer.decode(self._prefix_ids, skip_special_tokens=False)
        self._skeletons: dict[tuple[str, ...], _Skeleton | None] = {}
        # Ids without offsets, positions from the tokens' bytes (see token_bytes.py), where the
        # tokenizer allows it; else `encode_batch` with offsets.
        self._token_bytes = TokenBytes.for_tokenizer(self.tokenizer)
        fast = chat_tokenizer.fast_bpe() if encoder == "auto" else None
        self._encode_ids = IdsEncoder(self.tokenizer, fast if isinstance(fast, FastBPE) else None)

    # -- public -------------------------------------------------------------------------------

    @property
    def tiktoken_given_up(self) -> bool:
        """Whether tiktoken's BPE was to encode and has been given up (it differed once)."""
        return self._encode_ids.fast_given_up

    def mask(
        self,
        messages: list[Message] | tuple[Message, ...],
        max_length: int | None = None,
        overlong: str = "drop",
    ) -> MaskedExample:
        """Tokenizes and masks one conversation; raises MaskingError for a row to reject."""
        messages = list(messages)
        dropped = 0
        while True:
            example = self._mask_once(messages)
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

    def trained_turns(self, messages: list[Message]) -> list[int]:
        assistants = [i for i, m in enumerate(messages) if m.role == "assistant"]
        if self.policy.loss_on == "last-assistant":
            assistants = assistants[-1:]
        return [i for i in assistants if messages[i].train]

    def char_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """The trained character spans of `text`, the full rendering of `messages`."""
        turns = self.trained_turns(messages)
        if not turns:
            return []
        spans = self._spans_from_skeleton(messages, text, turns)
        if spans is not None:
            return spans
        bounds = self._bounds_from_prefixes(messages, text, turns)
        return [self._trained_span(text, gen_end, turn_end) for gen_end, turn_end in bounds]

    # -- steps ----------------------------------------------------------------------------------

    def mask_batch(
        self,
        conversations: list[list[Message]],
        max_length: int | None = None,
        overlong: str = "drop",
    ) -> list[MaskedExample | MaskingError]:
        """`mask` for many conversations, one result each (see `mask_many`)."""
        batch = self.mask_many(conversations, max_length, overlong)
        return [
            outcome if isinstance(outcome, MaskingError) else batch.example(outcome)
            for outcome in batch.outcomes
        ]

    def mask_many(
        self,
        conversations: list[list[Message]],
        max_length: int | None = None,
        overlong: str = "drop",
    ) -> MaskedBatch:
        """`mask` for many conversations, the examples laid end to end in flat arrays.

        The fast path: one `encode_batch` call for all of them, and the masks worked out with
        numpy over the whole batch (`_mask_rendered`).
        """
        outcomes: list[int | MaskingError] = []
        positions, texts, spans = [], [], []
        for position, messages in enumerate(conversations):
            try:
                text, text_spans = self._render_and_locate(list(messages))
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
                        example = self.mask(conversations[position], max_length, overlong)
                    except MaskingError as error:
                        example = error
                examples.append(example)
            batch = _gathered(examples)
        for position, outcome in zip(positions, batch.outcomes, strict=True):
            outcomes[position] = outcome
        return replace(batch, outcomes=outcomes)

    def _mask_once(self, messages: list[Message]) -> MaskedExample:
        text, spans = self._render_and_locate(messages)
        return self._masked(text, spans, self.tokenizer.encode(text, add_special_tokens=False))

    def _render_and_locate(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        text = self._render(messages, add_generation_prompt=False)
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
        spans = self.char_spans(messages, text)
        if not spans:
            raise MaskingError(
                "no_trained_tokens",
                "no assistant turn is trained (all are flagged train: false, or the last one "
                "is under --loss-on last-assistant); the row would add nothing to the loss",
            )
        return text, spans

    def _masked(self, text: str, spans: list[tuple[int, int]], encoding) -> MaskedExample:
        ids = encoding.ids
        mask = np.zeros(len(ids), dtype=np.int8)
        ranges, boundary = _trained_token_ranges(encoding, spans)
        if not ranges:
            raise _no_trained_tokens()
        for first, last in ranges:
            mask[first : last + 1] = 1
        if self._prefix_ids and not text.startswith(self._prefix_text):
            ids = self._prefix_ids + ids
            mask = np.concatenate([np.zeros(len(self._prefix_ids), dtype=np.int8), mask])
        return MaskedExample(np.asarray(ids, dtype=np.int32), mask, boundary)

    def _mask_rendered(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> MaskedBatch:
        """Tokenizes rendered texts in one batch and masks their trained character spans.

        Exactly what `_masked` gives for each text, without per-token offsets where the ids
        spell the text out (`TokenBytes.locate`) and every span edge falls between two tokens:
        the token starting at a span's start is its first trained token, the one ending at its
        end its last, and no token straddles an edge. Any other text goes through `_masked`.
        """
        if self._token_bytes is None:
            return self._mask_with_offsets(texts, spans)
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
        mask = _mask_of_ranges(len(ids), first, last)
        trained = np.bincount(
            span_rows[on_edges], weights=last + 1 - first, minlength=len(texts)
        ).astype(np.int64)

        prefixed = self._lacking_prefix(texts)
        if fast.all() and trained.all() and not prefixed.any():
            return _whole_batch(ids, mask, bounds, np.zeros(len(texts), np.int64))
        results: list[MaskedExample | MaskingError] = []
        for row, text in enumerate(texts):
            if not fast[row]:
                try:
                    encoding = self.tokenizer.encode(text, add_special_tokens=False)
                    results.append(self._masked(text, spans[row], encoding))
                except MaskingError as error:
                    results.append(error)
                continue
            if not trained[row]:
                results.append(_no_trained_tokens())
                continue
            rows = slice(bounds[row], bounds[row + 1])
            results.append(self._example(ids[rows], mask[rows], prefixed[row], 0))
        return _gathered(results)

    def _mask_with_offsets(
        self, texts: list[str], spans: list[list[tuple[int, int]]]
    ) -> MaskedBatch:
        """`_mask_rendered` for a tokenizer whose ids cannot give token positions: with the
        encodings' offsets, the ids of all texts end to end in one array and the masks set
        with numpy, not one small array per text."""
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
            ranges, boundary[row] = _trained_token_ranges(encoding, text_spans)
            trained[row] = bool(ranges)
            for first, last in ranges:
                firsts.append(base + first)
                lasts.append(base + last)
        mask = _mask_of_ranges(
            len(ids), np.asarray(firsts, dtype=np.int64), np.asarray(lasts, dtype=np.int64)
        )

        prefixed = self._lacking_prefix(texts)
        if trained.all() and not prefixed.any():
            return _whole_batch(ids, mask, bounds, boundary)
        results: list[MaskedExample | MaskingError] = []
        for row in range(len(texts)):
            if not trained[row]:
                results.append(_no_trained_tokens())
                continue
            rows = slice(bounds[row], bounds[row + 1])
            results.append(self._example(ids[rows], mask[rows], prefixed[row], int(boundary[row])))
        return _gathered(results)

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

    def _example(
        self, ids: np.ndarray, mask: np.ndarray, prefixed: bool, boundary: int
    ) -> MaskedExample:
        """One text's example from its stretch of a batch's arrays, its prefix put before it
        (untrained) where it lacks one."""
        if prefixed:
            ids = np.concatenate([np.asarray(self._prefix_ids, np.int32), ids])
            mask = np.concatenate([np.zeros(len(self._prefix_ids), np.int8), mask])
        return MaskedExample(ids, mask, boundary)

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages, add_generation_prompt)
        except TemplateError as error:
            raise MaskingError("template_error", f"the chat template refused it: {error}") from None

    def _trained_span(self, text: str, gen_end: int, turn_end: int) -> tuple[int, int]:
        """[start, end) of the answer plus, by policy, its end-of-turn token."""
        span = self._span_if_special_end(text, gen_end, turn_end)
        if span is not None:
            return span
        return (gen_end, gen_end + len(text[gen_end:turn_end].rstrip()))

    def _span_if_special_end(
        self, text: str, gen_end: int, turn_end: int
    ) -> tuple[int, int] | None:
        """The trained span when the turn ends in a special token (after whitespace), else None."""
        stripped = text[gen_end:turn_end].rstrip()
        end = gen_end + len(stripped)
        for special in self._special_texts:
            if stripped.endswith(special):
                return (gen_end, end if self.policy.train_on_eos else end - len(special))
        return None

    # -- turn boundaries -----------------------------------------------------------------------

    def _bounds_from_prefixes(
        self, messages: list[Message], text: str, turns: list[int]
    ) -> list[tuple[int, int]]:
        bounds = []
        for i in turns:
            prompt = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(prompt) and text.startswith(through)) or len(through) < len(
                prompt
            ):
                raise MaskingError(
                    "template_not_prefix_stable",
                    f"the chat template renders the conversation up to message {i} differently "
                    "from how the full conversation shows it (templates that drop reasoning "
                    f"from earlier turns do this), so turn {i} cannot be masked exactly; train "
                    "only the final answer with --loss-on last-assistant, or split the "
                    "conversation into one row per answer",
                )
            self._check_no_header(messages[i], text[len(prompt) : len(through)])
            bounds.append((len(prompt), len(through)))
        return bounds

    def _check_no_header(self, message: Message, output: str) -> None:
        at = output.find(message.content) if message.content else -1
        if at > 0 and any(special in output[:at] for special in self._special_texts):
            raise TemplateLayoutError(
                f"the chat template of {self.chat_tokenizer.path} emits the assistant header "
                f"inside the turn ({output[:at]!r}) instead of in its generation prompt, so the "
                "header cannot be told apart from the answer; use a template that supports "
                "add_generation_prompt"
            )

    def _spans_from_skeleton(
        self, messages: list[Message], text: str, turns: list[int]
    ) -> list[tuple[int, int]] | None:
        roles = tuple([m.role for m in messages])
        skeleton = self._skeletons.get(roles, _UNBUILT)
        if skeleton is _UNBUILT:
            skeleton = self._skeletons[roles] = self._build_skeleton(messages)
        if skeleton is None:
            return None
        # Put the real contents back and check that this is exactly what the template made.
        contents = [messages[index].content for index in skeleton.order]
        parts = [""] * (2 * len(contents) + 1)
        parts[0::2] = skeleton.pieces
        parts[1::2] = contents
        if "".join(parts) != text:
            return None
        # growth[k]: how much longer the real text is than the skeleton after k slots.
        growth = [
            0,
            *accumulate(map(operator.sub, map(len, contents), skeleton.placeholder_lengths)),
        ]
        spans = []
        for i in turns:
            turn = skeleton.turns.get(i)
            if turn is None:
                return None
            ends_in_special, start, slots_before_start, end, slots_before_end = turn
            start += growth[slots_before_start]
            end += growth[slots_before_end]
            spans.append((start, end) if ends_in_special else self._trained_span(text, start, end))
        return spans

    def _build_skeleton(self, messages: list[Message]) -> _Skeleton | None:
        placeholders = [
            Message(m.role, _placeholder(index), m.train) for index, m in enumerate(messages)
        ]
        try:
            full = self.template.render(placeholders, add_generation_prompt=False)
        except TemplateError:
            return None
        located = []
        for index in range(len(messages)):
            marker = _placeholder(index)
            at = full.find(marker)
            if at < 0 or full.find(marker, at + 1) >= 0:
                return None  # the template drops or repeats contents: no fast path
            located.append((at, index))
        located.sort()
        pieces, order, slot_starts, cursor = [], [], [], 0
        for at, index in located:
            pieces.append(full[cursor:at])
            order.append(index)
            slot_starts.append(at)
            cursor = at + len(_placeholder(index))
        pieces.append(full[cursor:])

        turns: dict[int, tuple[bool, int, int, int, int]] = {}
        for i, message in enumerate(placeholders):
            if message.role != "assistant":
                continue
            try:
                prompt = self.template.render(placeholders[:i], add_generation_prompt=True)
                through = self.template.render(placeholders[: i + 1], add_generation_prompt=False)
            except TemplateError:
                continue
            if full.startswith(prompt) and full.startswith(through) and len(through) >= len(prompt):
                self._check_no_header(message, through[len(prompt) :])
                span = self._span_if_special_end(full, len(prompt), len(through))
                start, end = span if span is not None else (len(prompt), len(through))
                turns[i] = (
                    span is not None,
                    start,
                    bisect_left(slot_starts, start),  # slots that start before it
                    end,
                    bisect_left(slot_starts, end),
                )
        placeholder_lengths = tuple(len(_placeholder(index)) for index in order)
        return _Skeleton(tuple(pieces), tuple(order), placeholder_lengths, turns)


# Character -> token lookups go through the encoding (Rust, ~0.2 us each) instead of building
# the Python list of all offsets (~30 us for 200 tokens), which dominated masking time.


def _first_token_at_or_after(encoding, span_start: int, span_end: int) -> tuple[int | None, bool]:
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


def _last_token_before(encoding, span_start: int, span_end: int) -> tuple[int | None, bool]:
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


def _trained_token_ranges(
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
        first, straddles_start = _first_token_at_or_after(encoding, span_start, span_end)
        last, straddles_end = _last_token_before(encoding, span_start, span_end)
        if first is None or last is None or last < first:
            continue
        ranges.append((first, last))
        boundary += straddles_start + straddles_end
    return ranges, boundary


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


def _mask_of_ranges(tokens: int, firsts: np.ndarray, lasts: np.ndarray) -> np.ndarray:
    """[tokens] int8: 1 on every token of the inclusive ranges firsts[k]..lasts[k]."""
    change = np.zeros(tokens + 1, dtype=np.int64)
    np.add.at(change, firsts, 1)
    np.add.at(change, lasts + 1, -1)
    return (np.cumsum(change[:-1]) > 0).astype(np.int8)


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
