"""Rows with tools through `prepare`: trained tokens written, preview.html showing tool
definitions, calls and responses apart, and a template without tools stopping the run."""

from __future__ import annotations

import html
import json

import pytest

from megasft.data import read_examples
from megasft.errors import ConfigError
from tests.data.conftest import as_example, trained_segments
from tests.data.test_prepare import run, write_jsonl
from tests.data.test_tools_masking import GLAIVE_ROW, MESSAGES_ROW

PLAIN = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_prepare_writes_tool_rows_and_previews_their_parts(
    tmp_path, tokenizer_dirs, chat_tokenizers
):
    data = write_jsonl(tmp_path / "data.jsonl", [MESSAGES_ROW, PLAIN])
    glaive = write_jsonl(tmp_path / "glaive.jsonl", [GLAIVE_ROW])
    manifest, output = run(
        tmp_path, [data, glaive], tokenizer_dirs["mistral-tools"], pack=False, val_fraction=0.0
    )
    assert manifest["examples"] == 3 and manifest["rejected"]["total"] == 0
    chat = chat_tokenizers["mistral-tools"]
    segments = [trained_segments(as_example(e), chat.tokenizer) for e in read_examples(output)]
    assert segments == [
        ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>', " It is 21 C.</s>"],
        [" yo</s>"],
        [
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_weather", "arguments": {"city": "Lyon"}}]</s>',
            " 21 and 25.</s>",
        ],
    ]  # fmt: skip
    page = (output / "preview.html").read_text(encoding="utf-8")
    assert page.count('<div class="conversation">') == 2  # not for the row without tools
    assert "tool definitions (get_weather), not trained" in page
    assert "message 1: tool calls, trained" in page
    assert "message 2: tool response, not trained" in page
    calls = [{"name": "get_weather", "arguments": {"city": c}} for c in ("Paris", "Lyon")]
    assert html.escape(json.dumps(calls, indent=1)) in page


def test_prepare_with_a_template_that_drops_tools_stops_naming_it(tmp_path, tokenizer_dirs):
    data = write_jsonl(tmp_path / "data.jsonl", [PLAIN, MESSAGES_ROW])
    with pytest.raises(ConfigError, match="does not render tools") as caught:
        run(tmp_path, [data], tokenizer_dirs["chatml"])
    assert str(tokenizer_dirs["chatml"]) in str(caught.value)


def test_tools_field_reads_the_definitions_from_another_column(
    tmp_path, tokenizer_dirs, chat_tokenizers
):
    row = {**MESSAGES_ROW, "functions": MESSAGES_ROW["tools"]}
    del row["tools"]
    data = write_jsonl(tmp_path / "data.jsonl", [row])
    manifest, output = run(
        tmp_path, [data], tokenizer_dirs["mistral-tools"], tools_field="functions", pack=False
    )
    assert manifest["examples"] == 1
    (example,) = [*read_examples(output), *read_examples(output, "val")]
    text = chat_tokenizers["mistral-tools"].tokenizer.decode(
        example["input_ids"], skip_special_tokens=False
    )
    assert text.startswith('<s>[AVAILABLE_TOOLS][{"type": "function"')
    with pytest.raises(ConfigError, match="--tools-field and --map tools"):
        run(
            tmp_path,
            [data],
            tokenizer_dirs["chatml"],
            tools_field="a",
            column_map=(("tools", "b"),),
        )
