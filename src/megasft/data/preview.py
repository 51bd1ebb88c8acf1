"""preview.html: a few examples, token by token, with the trained tokens highlighted.

The quickest way for a person to check that the masks are right for their template.
"""

from __future__ import annotations

import html
from pathlib import Path

from megasft.data.conversation import Conversation
from megasft.data.masking import MaskedExample
from megasft.data.preview_tools import TOOLS_STYLE, conversation_panel
from megasft.data.store import PREVIEW_FILE
from megasft.data.tokenizer import ChatTokenizer

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all;
           border: 1px solid #ccc; padding: 0.8em; margin-bottom: 1.5em; line-height: 1.6; }
.t { border-right: 1px dotted #bbb; }
.trained { background: #c8f0c8; }
.special { font-weight: bold; color: #7a3e9d; }
.legend span { padding: 0 0.4em; margin-right: 1em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
"""


def _token_html(text: str, trained: bool, special: bool) -> str:
    # Make whitespace visible where it matters for masks: newlines and leading spaces.
    shown = html.escape(text).replace("\n", "\u21b5\n")
    classes = "t" + (" trained" if trained else "") + (" special" if special else "")
    return f'<span class="{classes}">{shown}</span>'


def render_example(example: MaskedExample, chat_tokenizer: ChatTokenizer) -> str:
    tokenizer = chat_tokenizer.tokenizer
    special_ids = chat_tokenizer.special_token_ids
    parts = []
    for token_id, trained in zip(
        example.input_ids.tolist(), example.loss_mask.tolist(), strict=True
    ):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        parts.append(_token_html(text, bool(trained), token_id in special_ids))
    return "".join(parts)


def write_preview(
    directory: Path,
    examples: list[MaskedExample],
    chat_tokenizer: ChatTokenizer,
    manifest: dict,
    conversations: list[Conversation | None] | None = None,
) -> Path:
    """Writes preview.html; `conversations`, where given, are the examples' rows, whose tool
    definitions, calls and responses are shown above their tokens (preview_tools.py)."""
    conversations = conversations or [None] * len(examples)
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{stats['examples']}</td><td>{stats['rows']}</td>"
        f"<td>{stats['tokens']}</td><td>{stats['loss_tokens']}</td>"
        f"<td>{stats['packing_efficiency']}</td></tr>"
        for name, stats in manifest["splits"].items()
    )
    blocks = "".join(
        f"<h3>Example {number} ({len(example.input_ids)} tokens, "
        f"{int(example.loss_mask.sum())} trained)</h3>"
        f"{conversation_panel(conversation) if conversation is not None else ''}"
        f'<div class="example">{render_example(example, chat_tokenizer)}</div>'
        for number, (example, conversation) in enumerate(
            zip(examples, conversations, strict=True), start=1
        )
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>megasft prepare preview</title>"
        f"<style>{_STYLE}{TOOLS_STYLE}</style></head><body><h1>megasft prepare: mask preview</h1>"
        f"<p>Tokenizer <code>{html.escape(chat_tokenizer.path)}</code>, chat template from "
        f"<code>{html.escape(chat_tokenizer.template.origin)}</code>. "
        f"{manifest['rejected']['total']} rows rejected (see rejects.jsonl).</p>"
        "<table><tr><th>split</th><th>examples</th><th>rows</th><th>tokens</th>"
        f"<th>trained tokens</th><th>packing efficiency</th></tr>{rows}</table>"
        '<p class="legend"><span class="trained">trained token</span>'
        '<span class="special">special token</span> token boundaries are dotted; '
        "\u21b5 is a newline.</p>"
        f"{blocks}</body></html>"
    )
    path = directory / PREVIEW_FILE
    path.write_text(page, encoding="utf-8")
    return path
