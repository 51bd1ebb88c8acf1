"""Evaluation examples from a data file: the prompt to answer and the reference to score.

Rows are read like `megasft prepare` reads them (JSONL, JSON arrays, Parquet, gzip'd or not;
Alpaca, prompt/response, OpenAI messages, ShareGPT; `--map`, `--system-prompt`). The prompt
is the conversation minus its final assistant turn; the reference is that turn's content, or
the `--reference-field` column of the row when one is named.

A row may leave out its answer (a prompt-only row) when the reference comes from
`--reference-field` or the task needs none (`format`). Any other bad row stops the run: a
skipped row would silently change what the accuracy is measured on. `read_task_prompts` adds
what the task makes of each row: the prompt it poses and the reference's answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from megasft.data.conversation import Message, RowError
from megasft.data.formats import RowConverter
from megasft.data.readers import check_inputs, iter_raw_rows, parse_payload
from megasft.data.template import TemplateError
from megasft.data.tokenizer import ChatTokenizer
from megasft.errors import InputError
from megasft.evaluate.tasks import Task

# Conversion failures that mean only "this row has no answer".
_NO_ANSWER_REASONS = ("missing_field", "no_assistant_turn")
_PLACEHOLDER = "megasft-placeholder-answer"
_SHOWN_ERRORS = 5


@dataclass(frozen=True, slots=True)
class EvalExample:
    source: str
    row: int
    """1-based row in the source file (as in `megasft prepare`'s rejects)."""
    prompt: tuple[Message, ...]
    """The conversation up to the answer; rendered with the generation prompt."""
    reference: str | None
    """The reference answer text, or None (a `format` task row without an answer). A final
    answer made of tool calls gives their JSON list of `{name, arguments}`."""
    tools: list[dict] | None = None
    """The row's tool definitions, rendered into the prompt by the template."""


@dataclass(frozen=True)
class TaskPrompts:
    examples: list[EvalExample]
    """The rows, each with the prompt the task poses."""
    expected: list[str | None]
    """The normalised reference answer of each example (None where the task needs none)."""


def read_task_prompts(
    task: Task,
    path: str | Path,
    fmt: str = "auto",
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    reference_field: str | None = None,
    limit: int | None = None,
) -> TaskPrompts:
    """The examples of a data file as `task` poses and scores them.

    Args:
        task: the task (its prompt, whether it needs references, how it reads them).
        path, fmt, column_map, system_prompt, reference_field, limit: as for
            `read_eval_examples`.

    Returns:
        The examples with the task's prompts, and each reference's answer.

    Raises:
        InputError: naming the bad rows, or the references the task finds no answer in.
    """
    examples = read_eval_examples(
        path,
        fmt=fmt,
        column_map=column_map,
        system_prompt=system_prompt,
        reference_field=reference_field,
        reference_required=task.needs_reference,
        limit=limit,
    )
    examples = [replace(example, prompt=task.prompt(example)) for example in examples]
    expected = [
        task.reference_answer(example.reference) if example.reference is not None else None
        for example in examples
    ]
    unreadable = [
        example
        for example, answer in zip(examples, expected, strict=True)
        if task.needs_reference and answer is None
    ]
    if unreadable:
        shown = "\n  ".join(
            f"{example.source}, row {example.row}: {example.reference[-80:]!r}"
            for example in unreadable[:_SHOWN_ERRORS]
        )
        raise InputError(
            f"{len(unreadable)} reference(s) in {path} have no answer to compare with; "
            f"{task.reference_hint}:\n  {shown}"
        )
    return TaskPrompts(examples, expected)


def read_eval_examples(
    path: str | Path,
    fmt: str = "auto",
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    reference_field: str | None = None,
    reference_required: bool = True,
    limit: int | None = None,
) -> list[EvalExample]:
    """The examples of a data file.

    Args:
        path: the data file (any `prepare` input format).
        fmt, column_map, system_prompt: as `prepare`'s `--format`, `--map`, `--system-prompt`.
        reference_field: the column the reference comes from, instead of the final answer.
        reference_required: whether a row without a reference is an error.
        limit: how many examples to read (all when None).

    Returns:
        The examples, in file order.

    Raises:
        InputError: naming the bad rows (file, row, field) if any row cannot be used.
    """
    check_inputs([path])
    converter = RowConverter(fmt, column_map, system_prompt)
    examples: list[EvalExample] = []
    errors: list[str] = []
    for item in iter_raw_rows(path):
        if limit is not None and len(examples) >= limit:
            break
        if isinstance(item, RowError) and item.row == 0:
            # A whole-file problem (empty, truncated, not an array): nothing else to say.
            raise InputError(str(item))
        try:
            if isinstance(item, RowError):
                raise item
            record = parse_payload(item)
            examples.append(
                _example(
                    record, item.source, item.row, converter, reference_field, reference_required
                )
            )
        except RowError as error:
            errors.append(str(error))
    if errors:
        shown = "\n  ".join(errors[:_SHOWN_ERRORS])
        more = (
            f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        )
        raise InputError(
            f"{len(errors)} row(s) of {path} cannot be evaluated (evaluation never skips rows, "
            f"which would change what accuracy is measured on):\n  {shown}{more}"
        )
    if not examples:
        raise InputError(f"{path} holds no examples to evaluate")
    return examples


def _example(
    record: dict,
    source: str,
    row: int,
    converter: RowConverter,
    reference_field: str | None,
    reference_required: bool,
) -> EvalExample:
    answer_optional = reference_field is not None or not reference_required
    try:
        conversation = converter.convert(record, source, row)
        has_answer = True
    except RowError as error:
        if not answer_optional or error.reason not in _NO_ANSWER_REASONS:
            raise
        # A prompt-only row: convert it with a stand-in answer, which is then dropped. If that
        # still fails, something other than the answer is wrong, and the first error says what.
        stand_in = converter.with_answer(record, _PLACEHOLDER)
        if stand_in is None:
            raise
        try:
            conversation = converter.convert(stand_in, source, row)
        except RowError:
            raise error from None
        has_answer = False

    messages = conversation.messages
    if messages[-1].role != "assistant":
        raise RowError(
            source,
            row,
            None,
            "not_ending_with_assistant",
            f"the conversation ends with a {messages[-1].role} message; to evaluate, it must "
            "end with the assistant answer (the reference), which is left out of the prompt",
        )
    prompt = tuple(messages[:-1])
    reference = messages[-1].content if has_answer else None
    if has_answer and messages[-1].tool_calls:
        reference = json.dumps([call["function"] for call in messages[-1].tool_calls])
    if reference_field is not None:
        reference = _reference_from_field(record, reference_field, source, row)
    if reference is None and reference_required:
        raise RowError(source, row, None, "missing_reference", "the row has no reference answer")
    return EvalExample(source, row, prompt, reference, conversation.tools)


def _reference_from_field(record: dict, field: str, source: str, row: int) -> str:
    value = record.get(field)
    if value is None:
        raise RowError(
            source,
            row,
            field,
            "missing_field",
            f"--reference-field {field} names a column this row does not have (or is null); "
            f"its columns are {', '.join(repr(key) for key in list(record)[:20])}",
        )
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowError(
            source, row, field, "wrong_type", f"a reference must be text or a number, not {value!r}"
        )
    return str(value)


def render_prompt(chat_tokenizer: ChatTokenizer, example: EvalExample) -> tuple[str, list[int]]:
    """Renders an example's prompt with the chat template and its generation prompt.

    Args:
        chat_tokenizer: the model's tokenizer and template.
        example: the example to render.

    Returns:
        The prompt text and its ids (with the tokenizer's BOS in front when the template did
        not write one, as in `prepare`).

    Raises:
        InputError: when the template refuses the prompt or it renders to no tokens.
    """
    try:
        text = chat_tokenizer.template.render(
            list(example.prompt), add_generation_prompt=True, tools=example.tools
        )
    except TemplateError as error:
        raise InputError(
            f"{example.source}, row {example.row}: the chat template of {chat_tokenizer.path} "
            f"refused the prompt: {error}"
        ) from error
    ids = chat_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    prefix = list(chat_tokenizer.prefix_ids)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    if not ids:
        raise InputError(
            f"{example.source}, row {example.row}: the prompt renders to no tokens at all"
        )
    return text, ids
