"""Reasoning and `--multi-turn split`: one example per assistant turn, each rendered as the
template renders that turn at inference, so a template that drops earlier reasoning (Qwen3)
gets every turn trained exactly; the manifest counts the split examples."""

from __future__ import annotations

import json

from megasft.data import read_examples
from megasft.data.conversation import Message
from megasft.data.formats import RowConverter
from megasft.data.split_turns import split_turns
from tests.data.conftest import as_example, make_masker, trained_segments
from tests.data.test_prepare import run, write_jsonl

REASONING_ROW = {
    "messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 and 2 make 4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "<think>\n3 and 3 make 6\n</think>\n\n6"},
    ]
}


def conversation():
    return RowConverter().convert(REASONING_ROW, "in.jsonl", 1).messages


def test_reasoning_content_is_read_for_assistant_turns():
    messages = conversation()
    assert messages[1] == Message("assistant", "It is 4.", reasoning_content="2 and 2 make 4")
    assert messages[3].reasoning_content is None


def test_split_trains_each_turn_as_rendered_at_inference(chat_tokenizers):
    chat = chat_tokenizers["qwen3"]
    masker = make_masker(chat)
    messages = conversation()
    first, second = split_turns(messages, masker.turns.trained_turns(messages))
    assert [m.train for m in second if m.role == "assistant"] == [False, True]
    one, two = (masker.mask(part) for part in (first, second))
    assert trained_segments(one, chat.tokenizer) == [
        "<think>\n2 and 2 make 4\n</think>\n\nIt is 4.<|im_end|>"
    ]
    assert trained_segments(two, chat.tokenizer) == [
        "<think>\n3 and 3 make 6\n</think>\n\n6<|im_end|>"
    ]
    # The second example's history is what the template shows at inference: no old reasoning.
    history = chat.tokenizer.decode(two.input_ids.tolist(), skip_special_tokens=False)
    assert "2 and 2 make 4" not in history
    assert history.startswith(chat.template.render(second[:3], add_generation_prompt=True))


def test_whole_conversation_is_still_rejected_without_split(chat_tokenizers):
    results = make_masker(chat_tokenizers["qwen3"]).mask_many([conversation()])
    assert results.outcomes[0].reason == "template_not_prefix_stable"


def test_prepare_split_counts_split_examples(tmp_path, tokenizer_dirs, chat_tokenizers):
    plain = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    data = write_jsonl(tmp_path / "data.jsonl", [REASONING_ROW, plain])
    settings = {"pack": False, "val_fraction": 0.0}
    manifest, output = run(
        tmp_path, [data], tokenizer_dirs["qwen3"], multi_turn="split", **settings
    )
    assert manifest["rows_read"] == 2
    assert manifest["examples"] == 3
    assert manifest["rejected"]["total"] == 0
    assert manifest["sources"][0]["rows"] == 2 and manifest["sources"][0]["examples"] == 3
    chat = chat_tokenizers["qwen3"]
    segments = [trained_segments(as_example(e), chat.tokenizer) for e in read_examples(output)]
    assert segments == [
        ["<think>\n2 and 2 make 4\n</think>\n\nIt is 4.<|im_end|>"],
        ["<think>\n3 and 3 make 6\n</think>\n\n6<|im_end|>"],
        ["yo<|im_end|>"],
    ]
    whole, _ = run(tmp_path, [data], tokenizer_dirs["qwen3"], name="whole", **settings)
    assert whole["examples"] == 1
    assert whole["rejected"]["by_reason"] == {"template_not_prefix_stable": 1}
    assert json.loads((output / "manifest.json").read_text())["examples"] == 3
