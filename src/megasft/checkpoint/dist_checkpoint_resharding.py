"""Regions of a DCP checkpoint that DCP itself must assemble (imports torch and DCP).

`dist_checkpoint_io` copies a region straight from the file when it is a contiguous block of
one stored chunk. A region spread over several chunks (a checkpoint megatron-core saved at
TP>1 stores each rank's slice as its own chunk), or stored through a DCP extension, is read
here with DCP's resharding loader into memory, one region at a time.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.tensor_bytes import MemoryBytes


class ReshardingReader:
    """Reads regions of the tensors of a DCP checkpoint with DCP's loader."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._storage_reader = dcp.FileSystemReader(directory)
        self.metadata: Metadata = self._storage_reader.read_metadata()

    def read(
        self, key: str, torch_dtype: str, offsets: tuple[int, ...], shape: tuple[int, ...]
    ) -> MemoryBytes:
        """The region of tensor `key` at `offsets` of `shape`, as bytes in memory."""
        target = torch.empty(shape, dtype=getattr(torch, torch_dtype))
        planner = _RegionLoadPlanner({key: (offsets, shape)})
        try:
            with _single_process_is_intended():
                dcp.load(
                    {key: target},
                    storage_reader=self._storage_reader,
                    planner=planner,
                    no_dist=True,
                )
        except CheckpointError:
            raise
        except Exception as error:  # a damaged data file raises many types
            raise CheckpointError(
                f"{self.directory}: cannot read {key!r} at {offsets} ({error}); the checkpoint "
                "is damaged"
            ) from error
        if planner.covered_elements[key] != math.prod(shape):
            raise CheckpointError(
                f"{self.directory}: the stored chunks of {key!r} do not cover region "
                f"{offsets}+{shape}; the checkpoint is incomplete"
            )
        array = target.reshape(-1).view(torch.uint8).numpy()  # [bytes], no copy
        return MemoryBytes(memoryview(array), owner=array)


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads one region of each requested tensor, from however the tensor was chunked."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions
        self.covered_elements: dict[str, int] = dict.fromkeys(regions, 0)

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        items = []
        for key, (offsets, shape) in self._regions.items():
            region = ChunkStorageMetadata(torch.Size(offsets), torch.Size(shape))
            stored = self.metadata.state_dict_metadata[key]
            for item in create_read_items_for_chunk_list(key, stored, [region]):
                self.covered_elements[key] += math.prod(item.lengths)
                items.append(item)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # The target holds exactly the region, so read items are placed relative to it.
        return self.state_dict[index.fqn]


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Run a one-process DCP load: silence DCP's warning that torch.distributed is not
    initialised (conversion runs in one process on purpose), and re-raise the original
    error of a failed read rather than DCP's per-rank wrapper around it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as error:
            for failure in error.failures.values():
                original = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(original, BaseException):
                    raise original from None
            raise
