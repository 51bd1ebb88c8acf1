"""The evaluation tasks: how a response is scored against its reference.

- `gsm8k`: the reference's answer is the number after `####` (see `extract_gsm8k_reference`);
  the response's answer comes from `#### N`, `<answer>N</answer>` or the last number; the
  two normalised numbers must be equal.
- `exact-match`: the response (or the inside of its last `<answer>` tag) and the reference,
  both normalised (`normalize_text`, numbers as numbers), must be equal.
- `format`: a response is correct when it matches `--format-pattern`; there is no reference.

Every task also reports the format accuracy: the share of responses that match the format
pattern (`re.search`). Without `--format-pattern`, each task has its default (DEFAULT_FORMATS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megasft.evaluate.extract import (
    Extraction,
    extract_gsm8k_reference,
    extract_number_answer,
    extract_text_answer,
)

TASKS = ("gsm8k", "exact-match", "format")

DEFAULT_FORMATS = {
    # An explicit final answer in one of the two formats the extractor prefers.
    "gsm8k": r"####\s*-?\$?\d|<answer>\s*-?\$?[\d.,]+\s*</answer>",
    # Anything but an empty (or whitespace-only) response.
    "exact-match": r"\S",
}
"""The format pattern of each task when `--format-pattern` is not given; `format` needs one."""


@dataclass(frozen=True, slots=True)
class Score:
    answer: str | None
    """The answer extracted from the response (normalised), or None."""
    method: str
    """How it was extracted (`extract.METHODS`)."""
    correct: bool
    format_ok: bool
    """Whether the response matches the format pattern."""


def needs_reference(task: str) -> bool:
    return task != "format"


def reference_answer(task: str, reference: str) -> str | None:
    """The normalised answer of a reference, or None when it has none (the caller reports it)."""
    if task == "gsm8k":
        return extract_gsm8k_reference(reference)
    if task == "exact-match":
        return extract_text_answer(reference).answer
    return None


def score(task: str, response: str, expected: str | None, format_pattern: re.Pattern) -> Score:
    """Scores one response against the reference answer `expected` (from `reference_answer`)."""
    format_ok = format_pattern.search(response) is not None
    if task == "gsm8k":
        extraction = extract_number_answer(response)
    elif task == "exact-match":
        extraction = extract_text_answer(response)
    else:
        extraction = Extraction(None, "none")
    if task == "format":
        correct = format_ok
    else:
        correct = extraction.answer is not None and extraction.answer == expected
    return Score(extraction.answer, extraction.method, correct, format_ok)
