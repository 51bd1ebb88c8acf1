"""The tokenize-and-mask stage's settings: `PrepareConfig`, one frozen dataclass.

Each field is declared with `megasft.settings.setting`, which gives `megasft prepare` its flags
(docs/cli.md); `megasft.data.prepare.prepare` runs the stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megasft.data.encode import ENCODER_CHOICES
from megasft.data.formats import FORMATS, parse_column_map
from megasft.data.masking import LOSS_ON_CHOICES, OVERLONG_CHOICES
from megasft.data.split_turns import MULTI_TURN_CHOICES
from megasft.settings import raise_problems, setting, setting_problems


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...] = setting(
        help="Input files: JSONL, JSON arrays or Parquet, optionally gzip'd.",
        flag="--input",
        metavar="FILE",
    )
    tokenizer: str = setting(
        help="A Hugging Face tokenizer directory with tokenizer.json (and its chat template).",
        metavar="DIR",
    )
    output: str = setting(
        help="The output directory; must not exist unless `overwrite`.", metavar="DIR"
    )
    format: str = setting(
        "auto",
        "The input format; auto detects it per file.",
        choices=("auto", *FORMATS),
    )
    column_map: tuple[tuple[str, str], ...] = setting(
        (),
        "Read a format's field from another column: (field, column) pairs, on the command line "
        "FIELD=COLUMN,... e.g. prompt=question,response=answer for GSM8K.",
        flag="--map",
        metavar="FIELD=COLUMN,...",
        parse=lambda text: tuple(parse_column_map(text).items()),
    )
    tools_field: str | None = setting(
        None,
        "The column that holds each row's tool definitions, when it is not `tools` (the same "
        "as --map tools=COLUMN).",
        metavar="COLUMN",
    )
    seq_length: int = setting(
        4096,
        "Longest sequence in tokens; longer examples are dropped or truncated (`overlong`).",
        metavar="N",
        at_least=2,
    )
    pack: bool = setting(
        True, "Pack examples into rows of `seq_length` tokens (best-fit-decreasing)."
    )
    loss_on: str = setting(
        "all-assistant", "Which assistant turns are trained.", choices=LOSS_ON_CHOICES
    )
    multi_turn: str = setting(
        "whole",
        "whole: one example per conversation; split: one per trained assistant turn, each "
        "rendered as at inference (for templates that drop earlier reasoning, such as Qwen3's).",
        choices=MULTI_TURN_CHOICES,
    )
    train_on_eos: bool = setting(True, "Train the end-of-turn token after each trained answer.")
    system_prompt: str | None = setting(
        None, "Added as the system message of conversations that have none.", metavar="TEXT"
    )
    val_fraction: float = setting(
        0.01,
        "Share of examples held out for validation, chosen by a hash of each example's content.",
        metavar="F",
    )
    seed: int = setting(0, "Seeds the split hash and the packing order.", metavar="S")
    on_error: str = setting(
        "skip",
        "skip: write bad rows to rejects.jsonl and go on; fail: stop at the first.",
        choices=("skip", "fail"),
    )
    workers: int = setting(
        default_factory=lambda: os.cpu_count() or 1,
        help="Tokenizer worker processes; 1 works in-process.",
        metavar="N",
        at_least=1,
    )
    overlong: str = setting(
        "drop",
        "What to do with examples longer than `seq_length`: drop rejects them, truncate-oldest "
        "drops their oldest turns.",
        choices=OVERLONG_CHOICES,
    )
    encoder: str = setting(
        "auto",
        "auto: tiktoken's BPE core where it gives the tokenizer's ids (byte-level BPE such as "
        "Qwen and Llama 3; about 3x faster; fast_bpe.py), else the tokenizer; tokenizers: "
        "always the tokenizer.",
        choices=ENCODER_CHOICES,
    )
    overwrite: bool = setting(False, "Replace the output directory if it exists.")
    progress: bool = setting(True, "Show a progress bar on stderr.", aliases={"--quiet": False})

    def __post_init__(self) -> None:
        problems = setting_problems(self)
        if not self.inputs:
            problems.append("give at least one --input file")
        if self.tools_field and dict(self.column_map).get("tools", self.tools_field) != (
            self.tools_field
        ):
            problems.append("--tools-field and --map tools=... name different columns")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        raise_problems(problems)
