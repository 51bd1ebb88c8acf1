"""The one in-memory shape every input format is turned into before templating."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    """One of ROLES."""
    content: str
    """The message text (list-of-parts content is already joined)."""
    train: bool = True
    """False when the data says not to train this message (`train: false` or `loss_weight: 0`).
    Only meaningful for assistant messages; the loss policy decides the rest."""
    tool_calls: tuple[dict, ...] | None = None
    """An assistant's calls, each `{"type": "function", "function": {"name", "arguments"}}`
    with `arguments` an object, as chat templates take them; None for a message without."""
    reasoning_content: str | None = None
    """An assistant's reasoning, given apart from its content; passed to the template, which
    renders it where it does (a `<think>` at the start of content is left to the template)."""


@dataclass(slots=True)
class Conversation:
    """One input row as an input format reads it (`megasft.data.formats`)."""

    format: str
    """The name of the format the row was read in."""
    messages: list[Message]
    """The messages, in order (a `--system-prompt` already put in front where it applies).
    Per-row values that a chat template takes beside the messages belong here as further
    fields, filled by the formats that read them."""
    tools: list[dict] | None = None
    """The row's tool definitions (OpenAI function schemas), passed to the template's `tools`;
    None for a row without."""


@dataclass(frozen=True, slots=True)
class RowError(Exception):
    """A bad input row. It is rejected (written to rejects.jsonl) and the run goes on,
    unless `--on-error fail`. `reason` is a short stable code counted in the manifest;
    `message` says what was wrong and what to do."""

    source: str
    row: int
    field: str | None
    reason: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}, row {self.row}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message} [{self.reason}]"

    def __reduce__(self):
        # Exceptions pickle through `args`, which a dataclass never sets; worker processes
        # send RowErrors back to the main process, so spell the fields out.
        return (RowError, (self.source, self.row, self.field, self.reason, self.message))

    def as_record(self) -> dict:
        return {
            "source": self.source,
            "row": self.row,
            "field": self.field,
            "reason": self.reason,
            "message": self.message,
        }
