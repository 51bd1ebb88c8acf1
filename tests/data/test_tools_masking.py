"""Tool definitions, calls and responses, masked as the template renders them: exact decoded
trained tokens for the real Qwen2.5 template (messages and glaive rows) and the Llama 3.1 and
Mistral tool layouts; definitions and responses are never trained."""

from __future__ import annotations

import json

import pytest

from megasft.data.conversation import Message
from megasft.data.formats import RowConverter
from megasft.data.masking import TemplateLayoutError
from megasft.data.tokenizer import load_chat_tokenizer
from tests.conftest import shared_path
from tests.data.conftest import make_masker, mask_each, trained_segments

WEATHER = {"name": "get_weather", "parameters": {"type": "object"}}
TOOLS = [{"type": "function", "function": WEATHER}]


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


ONE_CALL = [
    Message("system", "Be brief."),
    Message("user", "Weather in Paris?"),
    Message("assistant", "", True, (call("get_weather", city="Paris"),)),
    Message("tool", '{"temp": 21}'),
    Message("assistant", "It is 21 C."),
]

MESSAGES_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 21 C."},
    ],
    "tools": TOOLS,
}  # fmt: skip

GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "Paris and Lyon?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Lyon"}})},
        {"from": "observation", "value": "21"},
        {"from": "observation", "value": "25"},
        {"from": "gpt", "value": "21 and 25."},
    ],
    "tools": json.dumps([WEATHER]),
}  # fmt: skip


@pytest.fixture(scope="module")
def qwen():
    return load_chat_tokenizer(shared_path("data", "tokenizers", "qwen2.5"))


def masked_row(chat_tokenizer, record: dict, **policy):
    conversation = RowConverter().convert(record, "in.jsonl", 1)
    masker = make_masker(chat_tokenizer, **policy)
    single = masker.mask(conversation.messages, tools=conversation.tools)
    (batched,) = mask_each_with_tools(masker, [conversation])
    assert batched.input_ids.tolist() == single.input_ids.tolist()
    assert batched.loss_mask.tolist() == single.loss_mask.tolist()
    return single


def mask_each_with_tools(masker, conversations):
    batch = masker.mask_many(
        [c.messages for c in conversations], tools=[c.tools for c in conversations]
    )
    return [batch.example(outcome) for outcome in batch.outcomes]


def untrained_text(example, tokenizer) -> str:
    ids = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if not m]
    return tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)


def test_qwen_messages_row_trains_the_call_and_the_answer_only(qwen):
    example = masked_row(qwen, MESSAGES_ROW)
    assert trained_segments(example, qwen.tokenizer) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>",
        "It is 21 C.<|im_end|>",
    ]
    untrained = untrained_text(example, qwen.tokenizer)
    assert "# Tools" in untrained and '"name": "get_weather", "parameters"' in untrained
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in untrained


def test_qwen_glaive_row_renders_its_tools_and_joins_consecutive_calls(qwen):
    example = masked_row(qwen, GLAIVE_ROW)
    assert trained_segments(example, qwen.tokenizer) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>'
        "<|im_end|>",
        "21 and 25.<|im_end|>",
    ]
    untrained = untrained_text(example, qwen.tokenizer)
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in untrained
    assert "<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n</tool_response>" in (
        untrained
    )


def test_qwen_tool_rendering_matches_transformers(qwen):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(qwen.path)
    for record in (MESSAGES_ROW, GLAIVE_ROW):
        conversation = RowConverter().convert(record, "in.jsonl", 1)
        dicts = [
            {"role": m.role, "content": m.content}
            | ({"tool_calls": list(m.tool_calls)} if m.tool_calls else {})
            for m in conversation.messages
        ]
        for add_generation_prompt in (False, True):
            expected = reference.apply_chat_template(
                dicts,
                tools=conversation.tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            rendered = qwen.template.render(
                conversation.messages, add_generation_prompt, conversation.tools
            )
            assert rendered == expected


def test_llama31_tool_layout(chat_tokenizers):
    chat = chat_tokenizers["llama31-tools"]
    example = make_masker(chat).mask(ONE_CALL, tools=TOOLS)
    assert trained_segments(example, chat.tokenizer) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 21 C.<|eot_id|>",
    ]
    untrained = untrained_text(example, chat.tokenizer)
    assert "Environment: ipython" in untrained
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>' in untrained
    no_eos = make_masker(chat, train_on_eos=False).mask(ONE_CALL, tools=TOOLS)
    assert trained_segments(no_eos, chat.tokenizer) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "It is 21 C.",
    ]


def test_llama31_refusing_two_calls_is_a_row_rejection(chat_tokenizers):
    masker = make_masker(chat_tokenizers["llama31-tools"])
    two = (call("get_weather", city="Paris"), call("get_weather", city="Lyon"))
    messages = [Message("user", "q"), Message("assistant", "", True, two)]
    (result,) = mask_each(masker, [messages])
    assert result.reason == "template_error" and "single tool-calls" in result.message


def test_mistral_tool_layout(chat_tokenizers):
    chat = chat_tokenizers["mistral-tools"]
    example = make_masker(chat).mask(ONE_CALL, tools=TOOLS)
    assert trained_segments(example, chat.tokenizer) == [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>',
        " It is 21 C.</s>",
    ]
    assert untrained_text(example, chat.tokenizer) == (
        "<s>[AVAILABLE_TOOLS]" + json.dumps(TOOLS) + "[/AVAILABLE_TOOLS]"
        "[INST] Be brief.\n\nWeather in Paris?[/INST]"
        '[TOOL_RESULTS]{"temp": 21}[/TOOL_RESULTS]'
    )


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_template_without_tools_is_an_error_naming_it(chat_tokenizers, style):
    chat = chat_tokenizers[style]
    masker = make_masker(chat)
    with pytest.raises(TemplateLayoutError, match="does not render tools") as caught:
        masker.mask(ONE_CALL[:2] + [Message("assistant", "a")], tools=TOOLS)
    assert chat.path in str(caught.value)
    with pytest.raises(TemplateLayoutError, match="does not render tool_calls"):
        masker.mask_many([ONE_CALL])


def test_rows_without_tools_still_take_the_skeleton(chat_tokenizers):
    masker = make_masker(chat_tokenizers["llama31-tools"])
    plain = [Message("user", "hi"), Message("assistant", "hello")]
    masker.mask(plain)
    assert ("user", "assistant") in masker.turns._skeletons
    masker.mask(ONE_CALL, tools=TOOLS)
    assert ("system", "user", "assistant", "tool", "assistant") not in masker.turns._skeletons
