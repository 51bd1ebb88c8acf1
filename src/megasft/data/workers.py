"""Phase 1 of `prepare`: worker processes turn chunks of raw rows into masked examples.

Each row is parsed, converted (`formats.RowConverter`), rendered, tokenized and masked, and
assigned to train or val by a hash of its content; a chunk's examples come back end to end in
flat arrays. At most a few chunks are in flight, so memory does not grow with the input.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megasft.data.conversation import Conversation, Message, RowError
from megasft.data.formats import RowConverter
from megasft.data.masking import ConversationMasker, MaskedBatch, MaskingError, MaskPolicy
from megasft.data.preview_tools import has_tool_parts
from megasft.data.readers import RawRow, iter_raw_rows, parse_payload
from megasft.data.split_turns import split_turns
from megasft.data.tokenizer import ChatTokenizer, load_chat_tokenizer

if TYPE_CHECKING:
    from megasft.data.config import PrepareConfig

CHUNK_ROWS = 256
PREVIEW_ROWS = 8
"""Rows with tool parts per chunk whose conversations come back for preview.html."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A row that became an example."""

    source: str
    row: int
    format: str
    split: str
    index: int
    """Which example of its chunk's MaskedBatch it is."""
    continued: bool = False
    """A further example of the row before it (`--multi-turn split`): the row counts once."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """What a worker makes of a chunk of rows: the outcomes per row, in order (a row split into
    several examples has several), and the examples
    of the accepted ones laid end to end."""

    outcomes: list[Accepted | RowError]
    examples: MaskedBatch
    tiktoken_given_up: bool = False
    """Whether this worker's encoder has given tiktoken's BPE up (see encode.IdsEncoder)."""
    shown: dict[int, Conversation] | None = None
    """Example index -> its row's conversation, for the first few examples with tool parts
    (preview.html shows them); None when there are none."""


class _RowProcessor:
    """Everything a worker needs to turn raw rows into masked examples."""

    def __init__(self, config: PrepareConfig, chat_tokenizer: ChatTokenizer):
        column_map = dict(config.column_map)
        if config.tools_field:
            column_map["tools"] = config.tools_field
        self.converter = RowConverter(config.format, column_map or None, config.system_prompt)
        self.seq_length = config.seq_length
        self.overlong = config.overlong
        self.val_fraction = config.val_fraction
        self.split_turns = config.multi_turn == "split"
        self.seed_bytes = f"megasft-split-{config.seed}\0".encode()
        self.masker = ConversationMasker(
            chat_tokenizer, MaskPolicy(config.loss_on, config.train_on_eos), config.encoder
        )

    def process(self, chunk: list[RawRow]) -> Chunk:
        outcomes: list[list[Accepted | RowError]] = [[] for _ in chunk]
        converted: list[tuple[int, Conversation]] = []
        convert = self.converter.convert
        for position, raw in enumerate(chunk):
            try:
                converted.append((position, convert(parse_payload(raw), raw.source, raw.row)))
            except RowError as error:
                outcomes[position].append(error)
        parts = self._parts(converted)
        tools = [conversation.tools for _, conversation, _ in parts]
        examples = self.masker.mask_many(
            [messages for _, _, messages in parts],
            self.seq_length,
            self.overlong,
            tools if any(row_tools is not None for row_tools in tools) else None,
        )
        results: dict[int, list[int | MaskingError]] = {}
        for (position, _, _), result in zip(parts, examples.outcomes, strict=True):
            results.setdefault(position, []).append(result)
        shown: dict[int, Conversation] = {}
        for position, conversation in converted:
            raw = chunk[position]
            row_results = results[position]
            # A row is kept or rejected whole: every example it splits into, or none.
            failure = next((r for r in row_results if isinstance(r, MaskingError)), None)
            if failure is not None:
                error = RowError(raw.source, raw.row, None, failure.reason, failure.message)
                outcomes[position].append(error)
                continue
            split = self._split_of(conversation)
            if len(shown) < PREVIEW_ROWS and has_tool_parts(conversation):
                shown.update((index, conversation) for index in row_results)
            outcomes[position].extend(
                Accepted(raw.source, raw.row, conversation.format, split, index, part > 0)
                for part, index in enumerate(row_results)
            )
        flat = [outcome for row_outcomes in outcomes for outcome in row_outcomes]
        return Chunk(flat, examples, self.masker.tiktoken_given_up, shown or None)

    def _parts(
        self, converted: list[tuple[int, Conversation]]
    ) -> list[tuple[int, Conversation, list[Message]]]:
        """(row position, conversation, messages) of each example to mask: the whole
        conversation, or with `--multi-turn split` one part per trained turn."""
        if not self.split_turns:
            return [(position, c, c.messages) for position, c in converted]
        parts = []
        for position, conversation in converted:
            messages = conversation.messages
            turns = self.masker.turns.trained_turns(messages)
            # No trained turn: masked whole, which rejects it with the usual reason.
            for part in split_turns(messages, turns) if turns else [messages]:
                parts.append((position, conversation, part))
        return parts

    def _split_of(self, conversation: Conversation) -> str:
        """train or val from a hash of the content, so adding data never moves an example."""
        if self.val_fraction <= 0.0:
            return "train"
        digest = hashlib.blake2b(self.seed_bytes, digest_size=8)
        for message in conversation.messages:
            digest.update(message.role.encode())
            digest.update(b"\0")
            digest.update(message.content.encode("utf-8", "surrogatepass"))
            digest.update(b"\1" if message.train else b"\2")
            if message.tool_calls is not None:
                # Only rows with calls hash them: every other row keeps its split.
                digest.update(json.dumps(message.tool_calls, sort_keys=True).encode())
        if conversation.tools is not None:
            digest.update(json.dumps(conversation.tools, sort_keys=True).encode())
        unit = int.from_bytes(digest.digest(), "big") / 2**64
        return "val" if unit < self.val_fraction else "train"


_worker: _RowProcessor | None = None


def _init_worker(config: PrepareConfig, chat_tokenizer: ChatTokenizer | None) -> None:
    # One process per core already: the tokenizer's own batch parallelism stays off (and so
    # a forked worker never touches a thread pool it did not start).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _worker
    if chat_tokenizer is None:
        chat_tokenizer = load_chat_tokenizer(config.tokenizer)
    _worker = _RowProcessor(config, chat_tokenizer)


def _process_chunk(chunk: list[RawRow]) -> Chunk:
    assert _worker is not None
    return _worker.process(chunk)


def _raw_row_chunks(inputs: Iterable[str]) -> Iterator[list[RawRow] | RowError]:
    """Chunks of raw rows; file-level problems pass through as they come."""
    chunk: list[RawRow] = []
    for path in inputs:
        for item in iter_raw_rows(path):
            if isinstance(item, RowError):
                if chunk:
                    yield chunk
                    chunk = []
                yield item
                continue
            chunk.append(item)
            if len(chunk) >= CHUNK_ROWS:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def processed_chunks(
    config: PrepareConfig, chat_tokenizer: ChatTokenizer
) -> Iterator[Chunk | RowError]:
    """All chunks of the inputs, processed, and the reader's errors, in input order.

    Args:
        config: the stage's settings; `config.workers` processes do the work (1: this one).
        chat_tokenizer: the loaded tokenizer, inherited by forked workers.

    Returns:
        An iterator of `Chunk`s and of the `RowError`s the readers yield between them (a bad
        row that could not be split off, or a whole-file problem with row 0).
    """
    chunks = _raw_row_chunks(config.inputs)
    if config.workers == 1:
        processor = _RowProcessor(config, chat_tokenizer)
        for chunk in chunks:
            yield chunk if isinstance(chunk, RowError) else processor.process(chunk)
        return

    import multiprocessing

    if can_fork():
        # The workers start as copies of this process, the tokenizer loaded and the modules
        # imported (loading Qwen2.5's tokenizer alone takes half a second).
        context, inherited = multiprocessing.get_context("fork"), chat_tokenizer
    else:
        # Each worker imports megasft and loads the tokenizer from its directory, which is
        # cheaper than pickling the loaded one (its whole JSON) into every worker.
        context, inherited = multiprocessing.get_context("spawn"), None
    with context.Pool(
        config.workers, initializer=_init_worker, initargs=(config, inherited)
    ) as pool:
        # A bounded window of chunks in flight: Pool.imap would read the whole input ahead.
        in_flight: deque = deque()
        for chunk in chunks:
            if isinstance(chunk, RowError):
                in_flight.append(chunk)
            else:
                in_flight.append(pool.apply_async(_process_chunk, (chunk,)))
            while len(in_flight) > 4 * config.workers:
                yield _resolve(in_flight.popleft())
        while in_flight:
            yield _resolve(in_flight.popleft())


def can_fork() -> bool:
    """Whether forking the workers is safe: on Linux, from a process with no other thread.

    A thread of the parent (a tracking client, a progress monitor) may hold a lock at the
    moment of the fork that no thread of the child would ever release. The tokenizer's own
    thread pool is no such thread in a worker: tokenizers turns its parallelism off in a
    forked child, and `_init_worker` keeps it off.
    """
    import threading

    return sys.platform == "linux" and threading.active_count() == 1


def _resolve(item) -> Chunk | RowError:
    return item if isinstance(item, RowError) else item.get()
