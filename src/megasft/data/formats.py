"""Turn one input record (a dict) into the list of `Message`s it stands for.

The formats, by the keys that identify them (`detect_format` checks them in this order):

- "messages" (OpenAI): `messages: [{role, content}, ...]`; roles are exactly ROLES; content is
  a string or a list of text parts `{"type": "text", "text": ...}`, joined with "".
- "sharegpt": `conversations: [{from, value}, ...]`; `from` is mapped by SHAREGPT_ROLES; an
  optional top-level `system` string becomes a leading system message (before any system
  turns of the conversation itself, which are kept).
- "alpaca": `instruction`, `output`, optional `input` and `system`. The user message is the
  instruction, then a blank line and the input when the input is not "".
- "prompt-response": `prompt` and `response` (or `completion`), optional `system`.

Decisions that hold for every format:

- Keys the format does not use are ignored, so extra columns (ids, sources, scores) are fine.
- A null value is the same as a missing key. Parquet and Arrow fill struct fields and columns
  that a row does not have with nulls, so `{"train": null}` must read like no `train` at all.
- Content is kept byte for byte, whitespace included: the chat template decides whitespace.
- A top-level `system` that is "" counts as absent (datasets often carry an empty column),
  while a system message with "" as its content is kept: someone wrote it.
- Per message (messages and ShareGPT), `"train": false` or `"loss_weight": 0` gives
  `Message(train=False)`. Only the loss weights 0 and 1 exist; anything else is rejected rather
  than silently rounded.
- Assistant messages with `tool_calls` are rejected ("unsupported_tool_calls"): `Message` has no
  place for the calls, and dropping them would teach the model replies to calls it never made.
  An assistant message whose content is null or missing is "empty_assistant"; for any other
  role a null or missing content is "missing_field".
- `system_prompt` (`--system-prompt`) adds a leading system message only to conversations that
  have none; a system message from the data wins.

Every problem raises `RowError` with the field's path in the record as the user wrote it (a
column renamed with `--map` is named by its source column) and a stable reason code.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from megasft.data.conversation import ROLES, Message, RowError
from megasft.errors import ConfigError

FORMATS = ("alpaca", "prompt-response", "messages", "sharegpt")

CANONICAL_FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "response",
    "completion",
    "messages",
    "conversations",
)
"""The field names the formats read; the left-hand sides of a column map."""

SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
"""ShareGPT `from` value -> role."""

_MESSAGES_ROLES = {role: role for role in ROLES}

ColumnMap = Mapping[str, str]
"""Canonical field name (CANONICAL_FIELDS) -> the column of the input that holds it."""


def parse_column_map(text: str) -> dict[str, str]:
    """Parse `--map` text such as "prompt=question,response=answer" into a column map.

    Each entry is CANONICAL=COLUMN, entries separated by commas, spaces around names ignored.
    Column names cannot contain "," or "=". Empty text gives an empty map. Raises `ConfigError`
    for a malformed entry, an unknown canonical name or a canonical name given twice.
    """
    column_map: dict[str, str] = {}
    if not text.strip():
        return column_map
    for entry in text.split(","):
        canonical, equals, column = (part.strip() for part in entry.partition("="))
        if not equals or not canonical or not column:
            raise ConfigError(
                f"--map {text!r}: {entry.strip()!r} is not CANONICAL=COLUMN; write pairs "
                "separated by commas, e.g. --map prompt=question,response=answer"
            )
        if canonical in column_map:
            raise ConfigError(f"--map {text!r}: {canonical!r} is mapped twice")
        column_map[canonical] = column
    _check_column_map(column_map)
    return column_map


def detect_format(record: Mapping, column_map: ColumnMap | None = None) -> str | None:
    """The format a record is in, by its keys, or None when it matches none.

    With `column_map`, the record is looked at as if the map had been applied (without copying
    it), so that a worker can detect the format of a raw row cheaply.
    """
    if column_map:
        return next(
            (
                fmt
                for key, fmt in _DETECTION_KEYS
                if record.get(column_map.get(key, key)) is not None
            ),
            None,
        )
    for key, fmt in _DETECTION_KEYS:
        if record.get(key) is not None:
            return fmt
    return None


def apply_column_map(record: dict, column_map: ColumnMap, source: str, row: int) -> dict:
    """A shallow copy of `record` in which each canonical field holds its mapped column's value.

    The source columns stay (they are ignored like any extra key). A mapped column that the row
    does not have raises `RowError` "missing_field" naming that column.
    """
    mapped = dict(record)
    for canonical, column in column_map.items():
        if column not in record:
            raise RowError(
                source,
                row,
                column,
                "missing_field",
                f"--map {canonical}={column} names a column this row does not have; its "
                f"columns are {_key_list(record)}",
            )
        mapped[canonical] = record[column]
    return mapped


def to_messages(
    record: dict,
    fmt: str,
    source: str,
    row: int,
    column_map: ColumnMap | None = None,
    system_prompt: str | None = None,
) -> list[Message]:
    """Convert one record in format `fmt` (one of FORMATS) into messages; raises `RowError`.

    `fmt="auto"` detects the format of this one row; keeping a file to one format is the
    caller's job (see `RowConverter`). `column_map` is applied first. `system_prompt` is added
    as a leading system message when the conversation has no system message.
    """
    original = record
    if column_map:
        record = apply_column_map(record, column_map, source, row)
    if fmt == "auto":
        detected = detect_format(record)
        if detected is None:
            raise unknown_format_error(original, source, row)
        fmt = detected
    return _convert(record, fmt, source, row, column_map, system_prompt)


class RowConverter:
    """`to_messages` plus the rule that, with format "auto", each file holds one format.

    The format of a file is the one of its first row with a recognisable shape; a later row in
    another format is rejected ("mixed_formats"). The lock is kept per source in this object,
    so in parallel workers it only holds within what one worker sees; to lock whole files
    across workers, detect per row (`detect_format`) and compare in one process, raising
    `mixed_formats_error`. Picklable.
    """

    def __init__(
        self,
        fmt: str = "auto",
        column_map: ColumnMap | None = None,
        system_prompt: str | None = None,
    ):
        if fmt != "auto" and fmt not in FORMATS:
            raise ConfigError(f"unknown --format {fmt!r}; use auto or one of: {', '.join(FORMATS)}")
        if column_map:
            _check_column_map(column_map)
        self.fmt = fmt
        self.column_map = dict(column_map) if column_map else None
        self.system_prompt = system_prompt
        self.file_formats: dict[str, str] = {}
        """Source -> the format locked for it (with fmt "auto")."""

    def convert(self, record: dict, source: str, row: int) -> list[Message]:
        """The record's messages; raises `RowError`, including "mixed_formats"."""
        original = record
        if self.column_map:
            record = apply_column_map(record, self.column_map, source, row)
        fmt = self.fmt
        if fmt == "auto":
            detected = detect_format(record)
            if detected is None:
                raise unknown_format_error(original, source, row)
            fmt = self.file_formats.setdefault(source, detected)
            if detected != fmt:
                raise mixed_formats_error(source, row, fmt, detected)
        return _convert(record, fmt, source, row, self.column_map, self.system_prompt)


def unknown_format_error(record: Mapping, source: str, row: int) -> RowError:
    return RowError(
        source,
        row,
        None,
        "unknown_format",
        f"the row matches no known format; its keys are {_key_list(record)}. Expected "
        "'messages' (OpenAI), 'conversations' (ShareGPT), 'instruction' + 'output' (Alpaca) "
        "or 'prompt' + 'response'/'completion'. If the columns have other names, map them "
        "with --map, e.g. --map prompt=question,response=answer",
    )


def mixed_formats_error(source: str, row: int, file_format: str, row_format: str) -> RowError:
    return RowError(
        source,
        row,
        None,
        "mixed_formats",
        f"this row is in {row_format} format, but the file's first row was in {file_format} "
        "format, and a file must hold one format. Split the file by format, or pass --format "
        "to read every row as one format.",
    )


# --- the formats -----------------------------------------------------------------------------


def _alpaca(record: dict, source: str, row: int) -> list[Message]:
    instruction = _required_text(record, "instruction", source, row)
    output = _required_text(record, "output", source, row)
    extra_input = _optional_text(record, "input", source, row)
    if not output or output.isspace():
        raise _empty_assistant(source, row, "output")
    messages = _top_level_system(record, source, row)
    messages.append(
        Message("user", instruction + "\n\n" + extra_input if extra_input else instruction)
    )
    messages.append(Message("assistant", output))
    return messages


def _prompt_response(record: dict, source: str, row: int) -> list[Message]:
    prompt = _required_text(record, "prompt", source, row)
    response_field = "response" if record.get("response") is not None else "completion"
    if record.get(response_field) is None:
        raise RowError(
            source,
            row,
            "response",
            "missing_field",
            "a prompt-response row needs 'response' (or 'completion'), and it is missing or null",
        )
    response = _required_text(record, response_field, source, row)
    if not response or response.isspace():
        raise _empty_assistant(source, row, response_field)
    messages = _top_level_system(record, source, row)
    messages.append(Message("user", prompt))
    messages.append(Message("assistant", response))
    return messages


def _openai_messages(record: dict, source: str, row: int) -> list[Message]:
    return _turns(record, "messages", "role", "content", _MESSAGES_ROLES, source, row)


def _sharegpt(record: dict, source: str, row: int) -> list[Message]:
    turns = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES, source, row)
    return _top_level_system(record, source, row) + turns


_BUILDERS = {
    "alpaca": _alpaca,
    "prompt-response": _prompt_response,
    "messages": _openai_messages,
    "sharegpt": _sharegpt,
}

_DETECTION_KEYS = (
    ("messages", "messages"),
    ("conversations", "sharegpt"),
    ("instruction", "alpaca"),
    ("prompt", "prompt-response"),
)
"""Key -> format, in the order `detect_format` tries them."""


def _convert(
    record: dict,
    fmt: str,
    source: str,
    row: int,
    column_map: ColumnMap | None,
    system_prompt: str | None,
) -> list[Message]:
    """`to_messages` after the column map is applied and the format is known."""
    build = _BUILDERS.get(fmt)
    if build is None:
        raise ConfigError(f"unknown format {fmt!r}; use one of: {', '.join(FORMATS)}")
    try:
        messages = build(record, source, row)
    except RowError as error:
        raise _explained(error, record, fmt, column_map) from None
    if system_prompt and not any(message.role == "system" for message in messages):
        messages.insert(0, Message("system", system_prompt))
    return messages


def _turns(
    record: dict,
    list_field: str,
    role_key: str,
    content_key: str,
    roles: Mapping[str, str],
    source: str,
    row: int,
) -> list[Message]:
    """The messages of a messages/ShareGPT row; the two differ only in key names and roles."""
    turns = record.get(list_field)
    if type(turns) is not list:
        raise _missing_or_wrong_type(source, row, list_field, turns, "an array of messages")
    if not turns:
        raise RowError(
            source, row, list_field, "empty_conversation", "the conversation has no messages"
        )
    messages = []
    has_assistant = False
    for index, turn in enumerate(turns):
        if type(turn) is not dict:
            raise _wrong_type(source, row, f"{list_field}[{index}]", turn, "an object")
        role_value = turn.get(role_key)
        role = roles.get(role_value) if type(role_value) is str else None
        if role is None:
            raise _bad_role(source, row, f"{list_field}[{index}].{role_key}", role_value, roles)
        content = turn.get(content_key)
        if role == "assistant" and turn.get("tool_calls"):
            raise RowError(
                source,
                row,
                f"{list_field}[{index}].tool_calls",
                "unsupported_tool_calls",
                "assistant messages with tool_calls are not supported yet: the calls cannot be "
                "rendered, and training without them would teach replies to calls never made. "
                "Leave such rows out, or write the call into the content as text.",
            )
        if type(content) is not str:
            content = _content_text(
                content, role, f"{list_field}[{index}].{content_key}", source, row
            )
        if role == "assistant":
            if not content or content.isspace():
                raise _empty_assistant(source, row, f"{list_field}[{index}].{content_key}")
            has_assistant = True
        train = True
        if turn.get("train") is not None or turn.get("loss_weight") is not None:
            train = _train_flag(turn, f"{list_field}[{index}]", source, row)
        messages.append(Message(role, content, train))
    if not has_assistant:
        raise RowError(
            source,
            row,
            list_field,
            "no_assistant_turn",
            "the conversation has no assistant message, so there is nothing to train on",
        )
    return messages


def _content_text(content: object, role: str, field: str, source: str, row: int) -> str:
    """Content that is not a plain string: a list of text parts, or an error."""
    if content is None and role == "assistant":
        raise _empty_assistant(source, row, field)
    if type(content) is not list:
        raise _missing_or_wrong_type(source, row, field, content, "a string or a list of parts")
    pieces = []
    for index, part in enumerate(content):
        if type(part) is not dict:
            raise _wrong_type(
                source, row, f"{field}[{index}]", part, 'an object {"type": "text", ...}'
            )
        part_type = part.get("type")
        if part_type != "text":
            if type(part_type) is not str:
                raise _missing_or_wrong_type(
                    source, row, f"{field}[{index}].type", part_type, "a string"
                )
            raise RowError(
                source,
                row,
                f"{field}[{index}].type",
                "unsupported_content",
                f"content parts of type {part_type!r} are not supported, only 'text': "
                "megasft trains on text. Leave such rows out.",
            )
        text = part.get("text")
        if type(text) is not str:
            raise _missing_or_wrong_type(source, row, f"{field}[{index}].text", text, "a string")
        pieces.append(text)
    return "".join(pieces)


def _train_flag(turn: dict, field: str, source: str, row: int) -> bool:
    """The message's `train` / `loss_weight`, which must agree when both are given."""
    train = turn.get("train")
    if train is not None and type(train) is not bool:
        raise _wrong_type(source, row, f"{field}.train", train, "true or false")
    weight = turn.get("loss_weight")
    if weight is None:
        return train
    if type(weight) not in (int, float):
        raise _wrong_type(source, row, f"{field}.loss_weight", weight, "a number, 0 or 1")
    if weight not in (0, 1):
        raise RowError(
            source,
            row,
            f"{field}.loss_weight",
            "unsupported_loss_weight",
            f"loss_weight {weight!r} is not supported: only 0 (do not train on this message) "
            "and 1 (train on it) are",
        )
    if train is not None and train != (weight == 1):
        raise RowError(
            source,
            row,
            field,
            "conflicting_train_flags",
            f"train is {str(train).lower()} but loss_weight is {weight!r}; give one, or make "
            "them agree",
        )
    return weight == 1


def _top_level_system(record: dict, source: str, row: int) -> list[Message]:
    system = _optional_text(record, "system", source, row)
    return [Message("system", system)] if system else []


# --- errors ----------------------------------------------------------------------------------


def _required_text(record: dict, field: str, source: str, row: int) -> str:
    value = record.get(field)
    if type(value) is not str:
        raise _missing_or_wrong_type(source, row, field, value, "a string")
    return value


def _optional_text(record: dict, field: str, source: str, row: int) -> str:
    """The field's text; "" when it is missing or null."""
    value = record.get(field)
    if value is None:
        return ""
    if type(value) is not str:
        raise _wrong_type(source, row, field, value, "a string")
    return value


def _missing_or_wrong_type(
    source: str, row: int, field: str, value: object, expected: str
) -> RowError:
    if value is None:
        return RowError(source, row, field, "missing_field", "required, but missing or null")
    return _wrong_type(source, row, field, value, expected)


_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _wrong_type(source: str, row: int, field: str, value: object, expected: str) -> RowError:
    got = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return RowError(source, row, field, "wrong_type", f"expected {expected}, got {got}: {shown}")


def _bad_role(
    source: str, row: int, field: str, value: object, roles: Mapping[str, str]
) -> RowError:
    if type(value) is not str:
        return _missing_or_wrong_type(source, row, field, value, "a string")
    return RowError(
        source,
        row,
        field,
        "unknown_role",
        f"unknown role {value!r}; allowed: {', '.join(roles)}",
    )


def _empty_assistant(source: str, row: int, field: str) -> RowError:
    return RowError(
        source,
        row,
        field,
        "empty_assistant",
        "the assistant message is empty (or only whitespace, or null), so there is nothing "
        "to train on",
    )


_FORMAT_FIELDS = {
    "alpaca": "'instruction' and 'output' (optional 'input', 'system')",
    "prompt-response": "'prompt' and 'response' or 'completion' (optional 'system')",
    "messages": "'messages', a list of {role, content}",
    "sharegpt": "'conversations', a list of {from, value} (optional 'system')",
}


def _explained(
    error: RowError, record: Mapping, fmt: str, column_map: ColumnMap | None
) -> RowError:
    """The error with the field named as in the input, and a hint when a whole field is missing.

    Only runs for rejected rows, so it may take its time.
    """
    field, message = error.field, error.message
    if error.reason == "missing_field" and field in CANONICAL_FIELDS:
        row_format = detect_format(record)
        if row_format not in (None, fmt):
            message += f"; this row looks like {row_format} format, not {fmt}: check --format"
        else:
            message += f"; {fmt} rows need {_FORMAT_FIELDS[fmt]}"
    if column_map and field:
        cut = min((i for i in (field.find("["), field.find(".")) if i >= 0), default=len(field))
        column = column_map.get(field[:cut])
        if column is not None:
            field = column + field[cut:]
    return RowError(error.source, error.row, field, error.reason, message)


def _check_column_map(column_map: ColumnMap) -> None:
    for canonical in column_map:
        if canonical in CANONICAL_FIELDS:
            continue
        if column_map[canonical] in CANONICAL_FIELDS:
            hint = (
                f"; the form is CANONICAL=COLUMN, did you mean {column_map[canonical]}={canonical}?"
            )
        elif close := difflib.get_close_matches(canonical, CANONICAL_FIELDS, n=1):
            hint = f"; did you mean {close[0]!r}?"
        else:
            hint = ""
        raise ConfigError(
            f"--map: {canonical!r} is not a field any format reads (they are: "
            f"{', '.join(CANONICAL_FIELDS)}){hint}"
        )


def _key_list(record: Mapping) -> str:
    keys = list(record)
    shown = ", ".join(repr(key) for key in keys[:20])
    return f"[{shown}{', ...' if len(keys) > 20 else ''}]"
