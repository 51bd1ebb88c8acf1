"""What an evaluation task is: how it poses a prompt, finds an answer and scores a response.

A task is a `Task` subclass in its own module of `megasft.evaluate.tasks`, registered under its
`--task` name with `@register_task`; docs/evaluate.md ("Adding a task") has the recipe.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from megasft.data.conversation import Message
    from megasft.evaluate.prompts import EvalExample


@dataclass(frozen=True, slots=True)
class Extraction:
    answer: str | None
    """The normalised answer, or None when the text holds none."""
    method: str
    """How it was found: one of the task's `extraction_methods`."""


@dataclass(frozen=True, slots=True)
class Score:
    answer: str | None
    """The answer extracted from the response (normalised), or None."""
    method: str
    """How it was extracted (one of the task's `extraction_methods`)."""
    correct: bool
    format_ok: bool
    """Whether the response matches the format pattern."""


class Task(ABC):
    """One way of scoring answers, picked by `--task`. Subclasses set the class attributes and
    implement `reference_answer` and `extract`; the rest has defaults that fit most tasks."""

    name: ClassVar[str]
    """The `--task` name."""
    extraction_methods: ClassVar[tuple[str, ...]]
    """Every `Extraction.method` that `extract` gives, in the order metrics.json counts them
    (`answer_extraction`)."""
    default_format_pattern: ClassVar[str | None] = None
    """The format pattern (`re.search`) when `--format-pattern` is not given; None when the
    task scores by the pattern, so the user must give one."""
    needs_reference: ClassVar[bool] = True
    """Whether every prompt must come with a reference answer."""
    reference_hint: ClassVar[str] = ""
    """What a usable reference looks like, for the error that lists the unusable ones."""
    metric_names: ClassVar[tuple[str, ...]] = (
        "accuracy",
        "format_accuracy",
        "mean_response_tokens",
    )
    """The metrics a model's scores on this task give (metrics.json); the gate may name them."""

    def prompt(self, example: EvalExample) -> tuple[Message, ...]:
        """The messages the model is asked to answer.

        Args:
            example: a row of the data file, its final assistant turn left out.

        Returns:
            The conversation to render with the generation prompt: by default the row's own.
        """
        return example.prompt

    @abstractmethod
    def reference_answer(self, reference: str) -> str | None:
        """The normalised answer of a reference.

        Args:
            reference: the reference text (the row's final assistant turn or its
                `--reference-field`).

        Returns:
            The answer `extract` is compared with, or None when the reference holds none (the
            caller reports the row, with `reference_hint`).
        """

    @abstractmethod
    def extract(self, response: str) -> Extraction:
        """The normalised answer of a model's response.

        Args:
            response: the generated text, special tokens included.

        Returns:
            The answer (None when there is none) and how it was found.
        """

    def score(self, response: str, expected: str | None, format_pattern: re.Pattern) -> Score:
        """Scores one response: correct when its answer equals the reference answer.

        Args:
            response: the generated text.
            expected: the reference's answer (`reference_answer`), None without a reference.
            format_pattern: what a well-formed response matches (`re.search`).

        Returns:
            The extracted answer, how it was found, whether it is correct and well-formed.
        """
        extraction = self.extract(response)
        correct = extraction.answer is not None and extraction.answer == expected
        format_ok = format_pattern.search(response) is not None
        return Score(extraction.answer, extraction.method, correct, format_ok)
