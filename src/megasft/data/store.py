"""The dataset on disk: Arrow IPC files, one per split, memory-mapped when read.

A `megasft prepare` output directory holds manifest.json, train.arrow and val.arrow
(`EXAMPLE_SCHEMA` rows), rejects.jsonl and preview.html. Each row is one training sequence;
`loss_mask[i] == 1` iff token `i` is a training target (the trainer shifts), and `seq_lengths`
lists the packed examples' lengths. See docs/prepare.md, "The output on disk".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from megasft.errors import InputError

EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("seq_lengths", pa.list_(pa.int32()), nullable=False),
    ],
    metadata={"megasft.loss_mask": "unshifted: loss_mask[i] == 1 iff token i is a target"},
)
SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.jsonl"
PREVIEW_FILE = "preview.html"


def split_file(directory: str | Path, split: str) -> Path:
    """The Arrow file of a split in a prepared dataset directory.

    Args:
        directory: the `megasft prepare` output directory.
        split: "train" or "val".

    Returns:
        The file's path (it may not exist).

    Raises:
        ValueError: an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return Path(directory) / f"{split}.arrow"


_NUMPY_TYPES = {pa.int8(): np.int8, pa.int32(): np.int32, pa.int64(): np.int64}
"""Arrow value type -> numpy dtype, for the types the example schema uses."""


def numpy_array(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A zero-copy Arrow array over a contiguous numpy array.

    Not `pa.array(values)` nor `value_type.to_pandas_dtype()`: both import pandas on first use
    (0.4-0.7 s), which a tokenizer run does not need.

    Args:
        values: the values (copied only if not contiguous or of another dtype).
        value_type: the Arrow type, one the example schema uses.

    Returns:
        The array.
    """
    values = np.ascontiguousarray(values, dtype=_NUMPY_TYPES[value_type])
    return pa.Array.from_buffers(value_type, len(values), [None, pa.py_buffer(values)])


def list_array(lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list array whose i-th list holds the next `lengths[i]` items of `values`.

    Args:
        lengths: [lists] the length of each list.
        values: [sum(lengths)] the items, end to end.
        value_type: the items' Arrow type.

    Returns:
        The list array.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(
        numpy_array(offsets, pa.int32()), numpy_array(values, value_type)
    )


def flat_example_batch(
    input_ids: np.ndarray, loss_mask: np.ndarray, lengths: np.ndarray
) -> pa.RecordBatch:
    """A record batch of one example per row, from the examples laid end to end: row i holds
    the next `lengths[i]` tokens.

    Args:
        input_ids: [tokens] every example's ids, end to end.
        loss_mask: [tokens] the matching loss mask.
        lengths: [examples] each example's length.

    Returns:
        An `EXAMPLE_SCHEMA` batch (unpacked: one entry in each row's `seq_lengths`).
    """
    seq_lengths = list_array(np.ones(len(lengths), np.int64), lengths, pa.int32())
    return pa.RecordBatch.from_arrays(
        [
            list_array(lengths, input_ids, pa.int32()),
            list_array(lengths, loss_mask, pa.int8()),
            seq_lengths,
        ],
        schema=EXAMPLE_SCHEMA,
    )


class SplitWriter:
    """Appends record batches to one Arrow IPC file."""

    def __init__(self, path: Path):
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, EXAMPLE_SCHEMA)
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Append a record batch (an empty one is skipped).

        Args:
            batch: `EXAMPLE_SCHEMA` rows.
        """
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def close(self) -> None:
        """Finish the file (its footer) and close it."""
        self._writer.close()
        self._sink.close()


def open_table(path: str | Path) -> pa.Table:
    """The whole file as a zero-copy, memory-mapped table.

    Args:
        path: an Arrow IPC file.

    Returns:
        The table.
    """
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def open_split(directory: str | Path, split: str = "train") -> pa.Table:
    """A split of a prepared dataset as a memory-mapped Arrow table.

    Args:
        directory: the `megasft prepare` output directory.
        split: "train" or "val".

    Returns:
        The split's table.

    Raises:
        InputError: the directory has no such file (not a prepared dataset).
        ValueError: an unknown split.
    """
    path = split_file(directory, split)
    if not path.is_file():
        raise InputError(
            f"{path} does not exist: {directory} is not a `megasft prepare` output directory"
        )
    return open_table(path)


def read_examples(directory: str | Path, split: str = "train") -> Iterator[dict]:
    """Each row of a split as a dict of `input_ids`, `loss_mask`, `seq_lengths` lists.

    Args:
        directory: the `megasft prepare` output directory.
        split: "train" or "val".

    Returns:
        An iterator over the rows.

    Raises:
        InputError: the directory has no such file (not a prepared dataset).
    """
    table = open_split(directory, split)
    for batch in table.to_batches(max_chunksize=1024):
        yield from batch.to_pylist()


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared dataset.

    Args:
        directory: the `megasft prepare` output directory.

    Returns:
        manifest.json, parsed.

    Raises:
        InputError: the directory has no manifest.json (not a prepared dataset).
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist: {directory} is not a `megasft prepare` output")
    return json.loads(path.read_text(encoding="utf-8"))
