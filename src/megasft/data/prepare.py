"""The tokenize-and-mask stage: chat data in, a packed Arrow dataset with loss masks out.

    prepare(PrepareConfig(inputs=("data.jsonl",), tokenizer="tok/", output="out/"))

Four phases: worker processes convert, render, tokenize and mask chunks of rows (workers.py);
this process takes their outcomes in input order, enforces one format per file, rejects bad
rows and spools the examples per split (spool.py); each split is packed and written as Arrow;
the manifest, rejects and preview are written and the directory is moved into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasft import __version__
from megasft.atomic import move_into_place
from megasft.data.config import PrepareConfig
from megasft.data.conversation import Conversation, RowError
from megasft.data.formats import FileFormats
from megasft.data.masking import MaskedExample
from megasft.data.preview import write_preview
from megasft.data.readers import check_inputs
from megasft.data.spool import SplitSpool, write_packed, write_unpacked
from megasft.data.store import MANIFEST_FILE, REJECTS_FILE, SPLITS, split_file
from megasft.data.tokenizer import ChatTokenizer, load_chat_tokenizer
from megasft.data.workers import Accepted, processed_chunks
from megasft.errors import InputError, MegasftError

PREVIEW_EXAMPLES = 8


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
    the workers can still be forked (`workers.can_fork`)."""

    monitor_interval = 0


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
    spools = {split: SplitSpool(staging, split) for split in SPLITS}
    tally = _Tally()
    file_formats = FileFormats()
    preview: list[MaskedExample] = []
    shown: list[Conversation | None] = []  # the preview examples' rows, where they have tools
    progress = _Progress(
        unit=" rows", desc="prepare", file=sys.stderr, disable=not config.progress, mininterval=1.0
    )
    with open(staging / REJECTS_FILE, "w", encoding="utf-8") as rejects:
        for chunk in processed_chunks(config, chat_tokenizer):
            # A RowError from the reader (a bad row or a whole-file problem) comes alone.
            outcomes = [chunk] if isinstance(chunk, RowError) else chunk.outcomes
            # Which examples of the chunk go to each split, in input order.
            chosen: dict[str, list[int]] = {split: [] for split in SPLITS}
            rows = 0
            row_kept = False
            for outcome in outcomes:
                if isinstance(outcome, Accepted) and outcome.continued:
                    # A further example of the row before it: kept with that row.
                    if row_kept:
                        chosen[outcome.split].append(outcome.index)
                        tally.per_source[outcome.source]["examples"] += 1
                    continue
                if isinstance(outcome, Accepted):
                    outcome = (
                        file_formats.check(outcome.source, outcome.row, outcome.format) or outcome
                    )
                row_kept = isinstance(outcome, Accepted)
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
                shown.append((chunk.shown or {}).get(index))
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
        if config.pack:
            rows = write_packed(spool, config.seq_length, config.seed, final)
        else:
            rows = write_unpacked(spool, final)
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

    manifest = _manifest(
        config, chat_tokenizer, tally, split_stats, file_formats.by_source, started
    )
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    write_preview(staging, preview, chat_tokenizer, manifest, shown)
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
