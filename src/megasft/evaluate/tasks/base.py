"""What an evaluation task is: how it poses a prompt, finds an answer and scores a response.

A task is a `Task` subclass in its own module of `megasft.evaluate.tasks`, registered under its
`--task` name with `@register_task` (or, for a family of names such as `lm-eval:TASK`, a factory
registered with `@register_task_family`); docs/evaluate.md ("Adding a task") has the recipe.
By default a task's prompts are read from the data file (`prompts.py`) and answered by megasft's
generation (`answers.py`); a task that brings its own pipeline overrides `prepare` and `answer`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from megasft.data.conversation import Message
    from megasft.evaluate.config import EvaluateConfig
    from megasft.evaluate.model import LoadedModel
    from megasft.evaluate.prompts import EvalExample, TaskPrompts


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
    uses_chat_template: ClassVar[bool] = True
    """Whether prompts are rendered with the model's chat template (False: a tokenizer without
    one is fine, the task poses its prompts itself)."""
    takes_fewshot: ClassVar[bool] = False
    """Whether `--num-fewshot` and `--fewshot-data` mean anything to this task."""

    def gives_metric(self, name: str) -> bool:
        """Whether this task's scores include the metric `name` (for the gate's early check)."""
        return name in self.metric_names

    def prepare(self, config: EvaluateConfig) -> TaskPrompts:
        """Everything the task can read and check before a model is loaded: its prompts.

        Args:
            config: the stage's settings (`data`, `format`, `column_map`, `limit`, ...).

        Returns:
            What `answer` takes; its `examples` are the prompts (their count goes into
            metrics.json). By default the data file's rows with their references' answers.

        Raises:
            InputError: naming the bad rows of the data file.
        """
        from megasft.evaluate.prompts import read_task_prompts

        return read_task_prompts(
            self,
            config.data,
            fmt=config.format,
            column_map=dict(config.column_map),
            system_prompt=config.system_prompt,
            reference_field=config.reference_field,
            limit=config.limit,
        )

    def answer(
        self,
        loaded: LoadedModel,
        role: str,
        prompts: TaskPrompts,
        config: EvaluateConfig,
        warnings: list[str],
    ) -> tuple[dict, list[dict]]:
        """One model's answers to the prompts, scored.

        Args:
            loaded: the model and its tokenizer.
            role: "tuned" or "base", as samples and warnings name the model.
            prompts: what `prepare` returned.
            config: the stage's settings (`engine`, `max_new_tokens`, `batch_size`, ...).
            warnings: gets a line for anything that makes the numbers less trustworthy.

        Returns:
            The model's metrics (`metric_names` and the counts that explain them) and one
            sample per prompt in data order, each with a boolean `correct` (the verdict the
            paired statistics compare) or None where the task has no right or wrong.
        """
        from megasft.evaluate.answers import answer_prompts

        return answer_prompts(loaded, role, self, prompts, config, warnings)

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
