"""The tokenize-and-mask stage: chat data in, a packed Arrow dataset with loss masks out.

    prepare(PrepareConfig(inputs=("data.jsonl",), tokenizer="tok/", output="out/"))

Four phases:
1. Stream the input rows in chunks to worker processes, which parse, convert, render,
   tokenize and mask them and assign each example to train or val by a hash of its content
   (`_process_chunk`); a chunk's examples come back end to end in flat arrays. At most a few
   chunks are in flight, so memory does not grow with the input.
2. In the main process, in input order: enforce one format per file, reject bad rows, and
   spool the examples to two temporary flat files per split (token ids, loss mask), keeping
   only their lengths in memory.
3. Pack each split with best-fit-decreasing over all its examples, reading the spool
   a batch at a time, and write the final Arrow files.
4. Write the manifest, the rejects and the preview, then move the directory into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from megasft import __version__
from megasft.atomic import move_into_place
from megasft.data.config import PrepareConfig
from megasft.data.conversation import Message, RowError
from megasft.data.formats import detect_format, to_messages, unknown_format_error
from megasft.data.formats import mixed_formats_error as _mixed_formats_error
from megasft.data.masking import (
    ConversationMasker,
    MaskedBatch,
    MaskedExample,
    MaskingError,
    MaskPolicy,
)
from megasft.data.packing import pack_best_fit_decreasing
from megasft.data.preview import write_preview
from megasft.data.readers import RawRow, check_inputs, iter_raw_rows, parse_payload
from megasft.data.store import (
    EXAMPLE_SCHEMA,
    MANIFEST_FILE,
    REJECTS_FILE,
    SPLITS,
    SplitWriter,
    flat_example_batch,
    list_array,
    split_file,
)
from megasft.data.tokenizer import ChatTokenizer, load_chat_tokenizer
from megasft.errors import InputError, MegasftError

CHUNK_ROWS = 256
WRITE_BATCH_TOKENS = 1 << 20
"""About this many tokens per Arrow record batch written (whole rows)."""
PREVIEW_EXAMPLES = 8


# --- phase 1: workers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Accepted:
    source: str
    row: int
    format: str
    split: str
    index: int
    """Which example of its chunk's MaskedBatch it is."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    """What a worker makes of a chunk of rows: an outcome per row, in order, and the examples
    of the accepted ones laid end to end."""

    outcomes: list[_Accepted | RowError]
    examples: MaskedBatch
    tiktoken_given_up: bool = False
    """Whether this worker's encoder has given tiktoken's BPE up (see encode.IdsEncoder)."""


class _RowProcessor:
    """Everything a worker needs to turn raw rows into masked examples."""

    def __init__(self, config: PrepareConfig, chat_tokenizer: ChatTokenizer):
        self.format = config.format
        self.column_map = dict(config.column_map) or None
        self.system_prompt = config.system_prompt
        self.seq_length = config.seq_length
        self.overlong = config.overlong
        self.val_fraction = config.val_fraction
        self.seed_bytes = f"megasft-split-{config.seed}\0".encode()
        self.masker = ConversationMasker(
            chat_tokenizer, MaskPolicy(config.loss_on, config.train_on_eos), config.encoder
        )

    def process(self, chunk: list[RawRow]) -> _Chunk:
        outcomes: list[_Accepted | RowError | None] = [None] * len(chunk)
        converted: list[tuple[int, str, list[Message]]] = []
        for position, raw in enumerate(chunk):
            try:
                record = parse_payload(raw)
                fmt = self.format
                if fmt == "auto":
                    fmt = detect_format(record, self.column_map)
                    if fmt is None:
                        raise unknown_format_error(record, raw.source, raw.row)
                messages = to_messages(
                    record, fmt, raw.source, raw.row, self.column_map, self.system_prompt
                )
                converted.append((position, fmt, messages))
            except RowError as error:
                outcomes[position] = error
        examples = self.masker.mask_many(
            [messages for _, _, messages in converted], self.seq_length, self.overlong
        )
        for (position, fmt, messages), result in zip(converted, examples.outcomes, strict=True):
            raw = chunk[position]
            if isinstance(result, MaskingError):
                outcomes[position] = RowError(
                    raw.source, raw.row, None, result.reason, result.message
                )
            else:
                outcomes[position] = _Accepted(
                    raw.source, raw.row, fmt, self._split_of(messages), result
                )
        return _Chunk(outcomes, examples, self.masker.tiktoken_given_up)

    def _split_of(self, messages: list[Message]) -> str:
        """train or val from a hash of the content, so adding data never moves an example."""
        if self.val_fraction <= 0.0:
            return "train"
        digest = hashlib.blake2b(self.seed_bytes, digest_size=8)
        for message in messages:
            digest.update(message.role.encode())
            digest.update(b"\0")
            digest.update(message.content.encode("utf-8", "surrogatepass"))
            digest.update(b"\1" if message.train else b"\2")
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


def _process_chunk(chunk: list[RawRow]) -> _Chunk:
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


def _processed_chunks(
    config: PrepareConfig, chat_tokenizer: ChatTokenizer
) -> Iterator[_Chunk | RowError]:
    """All chunks, processed, and file-level errors, in input order, computed by
    `config.workers` processes."""
    chunks = _raw_row_chunks(config.inputs)
    if config.workers == 1:
        processor = _RowProcessor(config, chat_tokenizer)
        for chunk in chunks:
            yield chunk if isinstance(chunk, RowError) else processor.process(chunk)
        return

    import multiprocessing

    if _can_fork():
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


def _can_fork() -> bool:
    """Whether forking the workers is safe: on Linux, from a process with no other thread.

    A thread of the parent (a tracking client, a progress monitor) may hold a lock at the
    moment of the fork that no thread of the child would ever release. The tokenizer's own
    thread pool is no such thread in a worker: tokenizers turns its parallelism off in a
    forked child, and `_init_worker` keeps it off.
    """
    import threading

    return sys.platform == "linux" and threading.active_count() == 1


def _resolve(item) -> _Chunk | RowError:
    return item if isinstance(item, RowError) else item.get()


# --- phase 2: collect ------------------------------------------------------------------------


class _SplitSpool:
    """Unpacked examples of one split, end to end in two flat files (token ids, loss mask),
    their lengths in memory. Packing reads them back a write batch at a time."""

    def __init__(self, directory: Path, split: str):
        self.ids_path = directory / f".spool-{split}.ids"
        self.mask_path = directory / f".spool-{split}.mask"
        # Open for the whole collect phase; `close` closes them.
        self._ids = open(self.ids_path, "wb")  # noqa: SIM115
        self._masks = open(self.mask_path, "wb")  # noqa: SIM115
        self._lengths: list[np.ndarray] = []
        self.examples = 0
        self.loss_tokens = 0

    def add(self, batch: MaskedBatch, indices: list[int]) -> None:
        """Appends the examples `indices` (increasing) of `batch`."""
        if not indices:
            return
        lengths = np.diff(batch.offsets)
        if len(indices) == len(lengths):
            ids, masks = batch.input_ids, batch.loss_mask
        else:
            keep = np.zeros(len(lengths), dtype=bool)
            keep[indices] = True
            tokens = np.repeat(keep, lengths)
            ids, masks, lengths = batch.input_ids[tokens], batch.loss_mask[tokens], lengths[keep]
        self._ids.write(np.ascontiguousarray(ids, dtype=np.int32).data)
        self._masks.write(np.ascontiguousarray(masks, dtype=np.int8).data)
        self._lengths.append(lengths)
        self.examples += len(lengths)
        self.loss_tokens += int(np.count_nonzero(masks))

    def close(self) -> None:
        self._ids.close()
        self._masks.close()

    def lengths(self) -> np.ndarray:
        """[examples] int64, in the order they were added."""
        return np.concatenate([np.zeros(0, np.int64), *self._lengths])

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, loss_mask) of the examples at token positions `starts` with `lengths`,
        end to end in that order.

        Read with one read per example, not through a memory map: the members of a packed
        batch come from all over the spool, and every page a map touches counts in the
        process's memory until it is unmapped, which made peak memory grow with the dataset.
        """
        total = int(lengths.sum())
        ids, masks = np.empty(total, np.int32), np.empty(total, np.int8)
        for path, out in ((self.ids_path, ids), (self.mask_path, masks)):
            size = out.itemsize
            view = memoryview(out).cast("B")
            with open(path, "rb", buffering=0) as spool:
                at = 0
                for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                    spool.seek(start * size)
                    spool.readinto(view[at : at + length * size])
                    at += length * size
        return ids, masks

    def remove(self) -> None:
        self.ids_path.unlink()
        self.mask_path.unlink()


@dataclass
class _Tally:
    rows_read: int = 0
    rejected: Counter = field(default_factory=Counter)
    boundary_tokens: int = 0
    truncated_examples: int = 0
    tiktoken_given_up: bool = False
    per_source: dict = field(default_factory=dict)


class _Progress(tqdm):
    """tqdm without its monitor thread (it only retunes the refresh of stalled bars), so that
    the workers can still be forked (`_can_fork`)."""

    monitor_interval = 0


# --- phase 3: pack ---------------------------------------------------------------------------


def _write_batches(row_tokens: np.ndarray) -> Iterator[slice]:
    """Consecutive rows in groups of about WRITE_BATCH_TOKENS tokens (at least one row each),
    so that the memory a write batch takes does not grow with --seq-length or the dataset."""
    ends = np.cumsum(row_tokens)
    start = 0
    while start < len(row_tokens):
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + WRITE_BATCH_TOKENS, "right")))
        yield slice(start, stop)
        start = stop


def _write_unpacked(spool: _SplitSpool, out: Path) -> int:
    """Writes the spooled examples to `out` as they are, one per row; returns the rows."""
    lengths = spool.lengths()
    starts = np.cumsum(lengths) - lengths
    writer = SplitWriter(out)
    for rows in _write_batches(lengths):
        ids, masks = spool.gather(
            starts[rows.start : rows.start + 1], lengths[rows].sum(keepdims=True)
        )
        writer.write(flat_example_batch(ids, masks, lengths[rows]))
    writer.close()
    return len(lengths)


def _write_packed(spool: _SplitSpool, config: PrepareConfig, out: Path) -> int:
    """Packs the spooled examples into `out`; returns the number of packed rows."""
    lengths = spool.lengths()
    example_starts = np.cumsum(lengths) - lengths
    rows = pack_best_fit_decreasing(lengths, config.seq_length, seed=config.seed)
    # The members of every row in order, rows end to end, and where each row's members begin.
    members = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    member_bounds = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(members, out=member_bounds[1:])
    order = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(member_bounds[-1]))
    member_lengths = lengths[order]
    row_tokens = np.add.reduceat(member_lengths, member_bounds[:-1]) if rows else members
    writer = SplitWriter(out)
    for batch_rows in _write_batches(row_tokens):
        chosen = slice(member_bounds[batch_rows.start], member_bounds[batch_rows.stop])
        # Their tokens end to end are exactly the concatenation of the batch's packed rows.
        ids, masks = spool.gather(example_starts[order[chosen]], member_lengths[chosen])
        batch = pa.RecordBatch.from_arrays(
            [
                list_array(row_tokens[batch_rows], ids, pa.int32()),
                list_array(row_tokens[batch_rows], masks, pa.int8()),
                list_array(members[batch_rows], member_lengths[chosen], pa.int32()),
            ],
            schema=EXAMPLE_SCHEMA,
        )
        writer.write(batch)
    writer.close()
    return len(rows)


# --- the stage -------------------------------------------------------------------------------


def prepare(config: PrepareConfig) -> dict:
    """Runs tokenize-and-mask; returns the manifest (also written to the output directory)."""
    started = time.monotonic()
    check_inputs(config.inputs)
    chat_tokenizer = load_chat_tokenizer(config.tokenizer)
    if config.encoder == "auto":
        chat_tokenizer.fast_bpe()  # built once here, before the workers are forked
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise InputError(
            f"output directory {output} already exists; pass --overwrite to replace it"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place at the end: a killed run leaves only a
    # directory that is visibly temporary, never a half-written dataset under the real name.
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _prepare_into(config, chat_tokenizer, staging, started)
        move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _prepare_into(
    config: PrepareConfig, chat_tokenizer: ChatTokenizer, staging: Path, started: float
) -> dict:
    spools = {split: _SplitSpool(staging, split) for split in SPLITS}
    tally = _Tally()
    file_formats: dict[str, str] = {}
    preview: list[MaskedExample] = []
    progress = _Progress(
        unit=" rows", desc="prepare", file=sys.stderr, disable=not config.progress, mininterval=1.0
    )
    with open(staging / REJECTS_FILE, "w", encoding="utf-8") as rejects:
        for chunk in _processed_chunks(config, chat_tokenizer):
            # A RowError from the reader (a bad row or a whole-file problem) comes alone.
            outcomes = [chunk] if isinstance(chunk, RowError) else chunk.outcomes
            # Which examples of the chunk go to each split, in input order.
            chosen: dict[str, list[int]] = {split: [] for split in SPLITS}
            rows = 0
            for outcome in outcomes:
                if isinstance(outcome, _Accepted):
                    locked = file_formats.setdefault(outcome.source, outcome.format)
                    if locked != outcome.format:
                        outcome = _mixed_formats_error(
                            outcome.source, outcome.row, locked, outcome.format
                        )
                source_stats = tally.per_source.setdefault(
                    outcome.source, {"rows": 0, "examples": 0, "rejected": 0}
                )
                if outcome.row > 0:
                    rows += 1
                    source_stats["rows"] += 1
                if isinstance(outcome, RowError):
                    if config.on_error == "fail":
                        raise MegasftError(
                            f"{outcome} (--on-error fail stops at the first bad row)"
                        )
                    rejects.write(json.dumps(outcome.as_record(), ensure_ascii=False) + "\n")
                    tally.rejected[outcome.reason] += 1
                    source_stats["rejected"] += 1
                    continue
                chosen[outcome.split].append(outcome.index)
                source_stats["examples"] += 1
            tally.rows_read += rows
            progress.update(rows)
            if isinstance(chunk, RowError):
                continue
            tally.tiktoken_given_up |= chunk.tiktoken_given_up
            examples = chunk.examples
            for split, indices in chosen.items():
                spools[split].add(examples, indices)
                tally.boundary_tokens += int(examples.boundary_tokens[indices].sum())
                tally.truncated_examples += int(np.count_nonzero(examples.dropped_turns[indices]))
            for index in chosen["train"][: PREVIEW_EXAMPLES - len(preview)]:
                preview.append(examples.example(index))
    progress.close()
    for spool in spools.values():
        spool.close()

    accepted = sum(spool.examples for spool in spools.values())
    if accepted == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in tally.rejected.most_common()) or "no rows"
        raise InputError(
            f"no valid example in {', '.join(config.inputs)} ({reasons}); "
            f"see the reasons above or run with --on-error fail to stop at the first bad row"
        )

    split_stats = {}
    for split, spool in spools.items():
        final = split_file(staging, split)
        rows = _write_packed(spool, config, final) if config.pack else _write_unpacked(spool, final)
        lengths = spool.lengths()
        spool.remove()
        tokens = int(lengths.sum())
        split_stats[split] = {
            "examples": len(lengths),
            "rows": rows,
            "tokens": tokens,
            "loss_tokens": spool.loss_tokens,
            "packing_efficiency": round(tokens / (rows * config.seq_length), 6) if rows else None,
            "max_example_tokens": int(lengths.max()) if len(lengths) else 0,
        }

    manifest = _manifest(config, chat_tokenizer, tally, split_stats, file_formats, started)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    write_preview(staging, preview, chat_tokenizer, manifest)
    return manifest


def _manifest(
    config: PrepareConfig,
    chat_tokenizer: ChatTokenizer,
    tally: _Tally,
    split_stats: dict,
    file_formats: dict[str, str],
    started: float,
) -> dict:
    sources = []
    for path in config.inputs:
        stats = tally.per_source.get(path, {"rows": 0, "examples": 0, "rejected": 0})
        sources.append(
            {"path": path, "sha256": _file_sha256(path), "format": file_formats.get(path), **stats}
        )
    settings = asdict(config)
    for key in ("inputs", "output", "workers", "overwrite", "progress"):
        settings.pop(key)
    settings["column_map"] = dict(config.column_map)
    return {
        "format_version": 1,
        "created_by": f"megasft {__version__}",
        "settings": settings,
        "sources": sources,
        "tokenizer": {
            "path": chat_tokenizer.path,
            "sha256": chat_tokenizer.sha256,
            "vocab_size": chat_tokenizer.tokenizer.get_vocab_size(with_added_tokens=True),
            "bos_token": chat_tokenizer.bos_token,
            "eos_token": chat_tokenizer.eos_token,
            "encoder": _encoder_record(config, chat_tokenizer, tally.tiktoken_given_up),
        },
        "chat_template": {
            "origin": chat_tokenizer.template.origin,
            "sha256": chat_tokenizer.template.sha256,
        },
        "rows_read": tally.rows_read,
        "examples": sum(stats["examples"] for stats in split_stats.values()),
        "rejected": {"total": sum(tally.rejected.values()), "by_reason": dict(tally.rejected)},
        "splits": split_stats,
        "tokens": sum(stats["tokens"] for stats in split_stats.values()),
        "loss_tokens": sum(stats["loss_tokens"] for stats in split_stats.values()),
        "packing_efficiency": split_stats["train"]["packing_efficiency"],
        "boundary_tokens": tally.boundary_tokens,
        "truncated_examples": tally.truncated_examples,
        "seconds": round(time.monotonic() - started, 3),
    }


def _encoder_record(config: PrepareConfig, chat_tokenizer: ChatTokenizer, given_up: bool) -> dict:
    """Which library encoded, and why not tiktoken where it did not."""
    if config.encoder == "tokenizers":
        return {"library": "tokenizers", "reason": "--encoder tokenizers"}
    fast = chat_tokenizer.fast_bpe()
    if isinstance(fast, str):
        return {"library": "tokenizers", "reason": f"tiktoken's BPE not used: {fast}"}
    if given_up:
        return {
            "library": "tiktoken, then tokenizers",
            "reason": "tiktoken's BPE gave other ids than the tokenizer on a text; from then "
            "on that worker encoded with the tokenizer (every batch before was checked)",
        }
    return {"library": "tiktoken", "reason": "byte-level BPE with merges ranked by token id"}


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
