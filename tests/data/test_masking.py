"""Exact trained tokens for each template style: decoded, not "some tokens are masked"."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from megasft.data.masking import MaskingError, TemplateLayoutError
from megasft.data.token_ranges import (
    first_token_at_or_after,
    last_token_before,
    trained_token_ranges,
)
from megasft.data.tokenizer import load_chat_tokenizer
from megasft.demo.tokenizer import build_tokenizer
from tests.data.conftest import (
    assert_batch_matches_single,
    make_masker,
    mask_each,
    trained_segments,
)
from tests.data.styles import STYLES

TWO_TURNS = [
    Message("system", "Be brief."),
    Message("user", "What is 2 + 2?"),
    Message("assistant", "It is 4."),
    Message("user", "And 3 + 3?"),
    Message("assistant", "6"),
]


def test_chatml_trains_answers_and_end_of_turn_only(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    example = make_masker(chat).mask(TWO_TURNS)
    assert trained_segments(example, chat.tokenizer) == ["It is 4.<|im_end|>", "6<|im_end|>"]


def test_chatml_injected_system_prompt_is_never_trained(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    example = make_masker(chat).mask([Message("user", "hello"), Message("assistant", "world")])
    text = chat.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert trained_segments(example, chat.tokenizer) == ["world<|im_end|>"]


def test_no_train_on_eos(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    example = make_masker(chat, train_on_eos=False).mask(TWO_TURNS)
    assert trained_segments(example, chat.tokenizer) == ["It is 4.", "6"]


def test_last_assistant_only(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    example = make_masker(chat, loss_on="last-assistant").mask(TWO_TURNS)
    assert trained_segments(example, chat.tokenizer) == ["6<|im_end|>"]


def test_per_message_flag_is_honoured(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    messages = list(TWO_TURNS)
    messages[2] = Message("assistant", "It is 4.", train=False)
    example = make_masker(chat).mask(messages)
    assert trained_segments(example, chat.tokenizer) == ["6<|im_end|>"]


def test_all_turns_flagged_off_is_rejected_not_emitted(chat_tokenizers):
    masker = make_masker(chat_tokenizers["chatml"])
    messages = [Message("user", "hi"), Message("assistant", "hello", train=False)]
    with pytest.raises(MaskingError) as caught:
        masker.mask(messages)
    assert caught.value.reason == "no_trained_tokens"


def test_last_assistant_flagged_off_under_last_assistant_is_rejected(chat_tokenizers):
    masker = make_masker(chat_tokenizers["chatml"], loss_on="last-assistant")
    messages = [*TWO_TURNS[:-1], Message("assistant", "6", train=False)]
    with pytest.raises(MaskingError) as caught:
        masker.mask(messages)
    assert caught.value.reason == "no_trained_tokens"


def test_llama3_headers_untrained_content_trimmed_and_single_bos(chat_tokenizers):
    chat = chat_tokenizers["llama3"]
    bos_id = chat.tokenizer.token_to_id("<|begin_of_text|>")
    # The tokenizer's post-processor would add a BOS too; the template already has one.
    assert chat.prefix_ids == (bos_id,)
    messages = [Message("user", "What is 2 + 2?"), Message("assistant", "  It is 4.  ")]
    example = make_masker(chat).mask(messages)
    assert example.input_ids.tolist().count(bos_id) == 1
    assert example.input_ids[0] == bos_id
    # The template trims the answer; the trained text is what it rendered.
    assert trained_segments(example, chat.tokenizer) == ["It is 4.<|eot_id|>"]


def test_llama3_multi_turn_with_system(chat_tokenizers):
    chat = chat_tokenizers["llama3"]
    example = make_masker(chat).mask(TWO_TURNS)
    assert trained_segments(example, chat.tokenizer) == ["It is 4.<|eot_id|>", "6<|eot_id|>"]


def test_mistral_inst_template(chat_tokenizers):
    chat = chat_tokenizers["mistral"]
    example = make_masker(chat).mask(TWO_TURNS)
    bos_id = chat.tokenizer.token_to_id("<s>")
    assert chat.prefix_ids == (bos_id,)  # add_bos_token; the template emits it, so no second
    assert example.input_ids.tolist().count(bos_id) == 1
    # The space the template puts before each answer belongs to the answer's first token.
    assert trained_segments(example, chat.tokenizer) == [" It is 4.</s>", " 6</s>"]
    untrained = chat.tokenizer.decode(
        [
            t
            for t, m in zip(example.input_ids.tolist(), example.loss_mask.tolist(), strict=True)
            if not m
        ],
        skip_special_tokens=False,
    )
    assert untrained == "<s>[INST] Be brief.\n\nWhat is 2 + 2? [/INST][INST] And 3 + 3? [/INST]"


def test_mistral_template_exception_becomes_row_rejection(chat_tokenizers):
    masker = make_masker(chat_tokenizers["mistral"])
    with pytest.raises(MaskingError) as caught:
        masker.mask([Message("user", "a"), Message("user", "b"), Message("assistant", "c")])
    assert caught.value.reason == "template_error"
    assert "alternate" in caught.value.message


REASONING_TURNS = [
    Message("user", "What is 2 + 2?"),
    Message("assistant", "<think>\n2 and 2 make 4\n</think>\nIt is 4."),
    Message("user", "And 3 + 3?"),
    Message("assistant", "<think>\n3 and 3 make 6\n</think>\n6"),
]


def test_reasoning_stripping_template_rejects_earlier_turns_instead_of_mis_masking(
    chat_tokenizers,
):
    masker = make_masker(chat_tokenizers["reasoning"])
    with pytest.raises(MaskingError) as caught:
        masker.mask(REASONING_TURNS)
    assert caught.value.reason == "template_not_prefix_stable"
    assert "--loss-on last-assistant" in caught.value.message


def test_reasoning_stripping_template_last_assistant_is_exact(chat_tokenizers):
    chat = chat_tokenizers["reasoning"]
    example = make_masker(chat, loss_on="last-assistant").mask(REASONING_TURNS)
    text = chat.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)
    assert "2 and 2 make 4" not in text  # the earlier reasoning really is dropped
    assert trained_segments(example, chat.tokenizer) == [
        "<think>\n3 and 3 make 6\n</think>\n6<|im_end|>"
    ]


def test_reasoning_template_without_reasoning_is_prefix_stable(chat_tokenizers):
    chat = chat_tokenizers["reasoning"]
    messages = [Message(m.role, m.content.split("\n")[-1]) for m in REASONING_TURNS]
    example = make_masker(chat).mask(messages)
    assert trained_segments(example, chat.tokenizer) == ["It is 4.<|im_end|>", "6<|im_end|>"]


def test_fast_and_prefix_paths_agree(chat_tokenizers):
    for name in ("chatml", "llama3", "mistral"):
        masker = make_masker(chat_tokenizers[name])
        text = masker.template.render(TWO_TURNS)
        turns = masker.turns.trained_turns(TWO_TURNS)
        fast = masker.turns._spans_from_skeleton(TWO_TURNS, text, turns)
        slow = [
            masker.turns._trained_span(text, gen_end, turn_end)
            for gen_end, turn_end in masker.turns._bounds_from_prefixes(TWO_TURNS, text, turns)
        ]
        assert fast is not None and fast == slow, name


def test_tool_turns_are_not_trained(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    messages = [
        Message("user", "weather?"),
        Message("assistant", "call weather()"),
        Message("tool", "sunny"),
        Message("assistant", "It is sunny."),
    ]
    example = make_masker(chat).mask(messages)
    assert trained_segments(example, chat.tokenizer) == [
        "call weather()<|im_end|>",
        "It is sunny.<|im_end|>",
    ]


def test_fallback_chatml_when_tokenizer_has_no_template(tmp_path):
    directory = build_tokenizer(tmp_path / "tok", chat_template=None)
    chat = load_chat_tokenizer(directory)
    assert chat.template.origin == "chatml-fallback"
    example = make_masker(chat).mask([Message("user", "hi"), Message("assistant", "hello")])
    text = chat.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert trained_segments(example, chat.tokenizer) == ["hello<|im_end|>"]


# --- tokens that straddle a span boundary ----------------------------------------------------

# No special token between the prompt and the answer: the answer follows "A:" directly.
GLUED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Q:' + message['content'] }}"
    "{% else %}{{ 'A:' + message['content'] + '<|im_end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)


def test_token_straddling_the_start_of_an_answer_is_not_trained(tmp_path):
    # A corpus that teaches merges across "A:" and the answer's first letters, so one token
    # holds the end of the generation prompt and the start of the answer.
    directory = build_tokenizer(
        tmp_path / "tok",
        chat_template=GLUED,
        corpus=["A:ab " * 50 + "Q:x " * 10],
        vocab_size=300,
        split_words=False,
    )
    chat = load_chat_tokenizer(directory)
    example = make_masker(chat).mask([Message("user", "x"), Message("assistant", "abab")])
    pieces = [
        chat.tokenizer.decode([t], skip_special_tokens=False) for t in example.input_ids.tolist()
    ]
    straddling = [p for p in pieces if p.startswith(("A:", ":")) and len(p.split(":")[1]) > 0]
    assert len(straddling) == 1, f"the corpus should make one 'A:a'-like token, got {pieces}"
    answer_part = straddling[0].split(":")[1]
    assert example.boundary_tokens == 1
    # The straddling token starts in the prompt: not trained. Everything after it is.
    trained_by_piece = dict(zip(pieces, example.loss_mask.tolist(), strict=True))
    assert trained_by_piece[straddling[0]] == 0
    assert "".join(trained_segments(example, chat.tokenizer)) == (
        "abab"[len(answer_part) :] + "<|im_end|>"
    )
    # The batch path finds the same straddling token and counts it the same.
    assert_batch_matches_single(
        make_masker(chat), [[Message("user", "x"), Message("assistant", "abab")]]
    )


def test_token_straddling_the_end_of_an_answer_is_trained(tmp_path):
    # The turn ends in plain newlines (no special token), which are not trained; the corpus
    # merges "x" with the newline after it, so one token runs past the end of the answer.
    template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}"
        "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
        "{% endfor %}"
    )
    directory = build_tokenizer(
        tmp_path / "tok",
        chat_template=template,
        corpus=["x\n" * 100],
        vocab_size=270,
        split_words=False,
    )
    chat = load_chat_tokenizer(directory)
    example = make_masker(chat).mask([Message("user", "q"), Message("assistant", "x")])
    pieces = [
        chat.tokenizer.decode([t], skip_special_tokens=False) for t in example.input_ids.tolist()
    ]
    assert pieces[-1] == "x\n"
    # "x\n" starts inside the answer "x" and runs past it: trained, and counted.
    assert trained_segments(example, chat.tokenizer) == ["x\n"]
    assert example.boundary_tokens == 1
    assert_batch_matches_single(
        make_masker(chat), [[Message("user", "q"), Message("assistant", "x")]]
    )


def test_unicode_offsets_are_characters_not_bytes(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    messages = [Message("user", "¿Qué tal? 日本語 🙂"), Message("assistant", "Très bien, 谢谢 🙂!")]
    example = make_masker(chat).mask(messages)
    assert trained_segments(example, chat.tokenizer) == ["Très bien, 谢谢 🙂!<|im_end|>"]


# --- truncation and length --------------------------------------------------------------------


def _long_conversation(turns: int) -> list[Message]:
    messages = [Message("system", "sys")]
    for i in range(turns):
        messages += [Message("user", f"question {i} " * 5), Message("assistant", f"answer {i}")]
    return messages


def test_too_long_is_rejected_by_default(chat_tokenizers):
    masker = make_masker(chat_tokenizers["chatml"])
    full = masker.mask(_long_conversation(4))
    with pytest.raises(MaskingError) as caught:
        masker.mask(_long_conversation(4), max_length=len(full.input_ids) - 1)
    assert caught.value.reason == "too_long"


def test_truncate_oldest_keeps_system_and_final_answer(chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    masker = make_masker(chat)
    one_turn_less = masker.mask(_long_conversation(4)[:1] + _long_conversation(4)[3:])
    example = masker.mask(
        _long_conversation(4), max_length=len(one_turn_less.input_ids), overlong="truncate-oldest"
    )
    assert example.dropped_turns == 2
    assert example.input_ids.tolist() == one_turn_less.input_ids.tolist()
    text = chat.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nsys<|im_end|>")
    assert "question 0" not in text
    assert trained_segments(example, chat.tokenizer)[-1] == "answer 3<|im_end|>"


def test_truncate_oldest_gives_up_when_the_last_exchange_alone_is_too_long(chat_tokenizers):
    masker = make_masker(chat_tokenizers["chatml"])
    with pytest.raises(MaskingError) as caught:
        masker.mask(_long_conversation(3), max_length=5, overlong="truncate-oldest")
    assert caught.value.reason == "too_long"


def test_batch_and_single_give_the_same_result(chat_tokenizers):
    masker = make_masker(chat_tokenizers["llama3"])
    conversations = [TWO_TURNS, [Message("user", "x"), Message("assistant", "y")], TWO_TURNS[1:3]]
    batch = mask_each(masker, conversations)
    for conversation, batched in zip(conversations, batch, strict=True):
        single = masker.mask(conversation)
        assert batched.input_ids.tolist() == single.input_ids.tolist()
        assert batched.loss_mask.tolist() == single.loss_mask.tolist()


def test_template_emitting_the_header_inside_the_turn_is_refused(tmp_path):
    # No generation prompt at all: the assistant header would be indistinguishable from the answer.
    template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
    )
    chat = load_chat_tokenizer(build_tokenizer(tmp_path / "tok", chat_template=template))
    with pytest.raises(TemplateLayoutError, match="generation prompt"):
        make_masker(chat).mask([Message("user", "hi"), Message("assistant", "hello")])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_round_trips_the_rendered_text(chat_tokenizers, style):
    chat = chat_tokenizers[style]
    messages = TWO_TURNS if style != "reasoning" else REASONING_TURNS[:2]
    example = make_masker(chat).mask(messages)
    decoded = chat.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)
    assert decoded == chat.template.render(messages)


def test_lone_surrogate_is_a_row_rejection_not_a_crash(chat_tokenizers):
    masker = make_masker(chat_tokenizers["chatml"])
    results = mask_each(
        masker, [[Message("user", "bad \ud800"), Message("assistant", "x")], TWO_TURNS]
    )
    assert isinstance(results[0], MaskingError) and results[0].reason == "invalid_utf8"
    assert results[1].loss_mask.sum() > 0


def test_answer_ending_in_a_multi_byte_character_keeps_all_its_tokens(chat_tokenizers):
    # The tiny tokenizer has no token for the emoji: it is several byte tokens sharing one
    # character offset, and the answer ends on it when the end-of-turn token is not trained.
    chat = chat_tokenizers["chatml"]
    example = make_masker(chat, train_on_eos=False).mask(
        [Message("user", "smile"), Message("assistant", "ok 🙂")]
    )
    assert trained_segments(example, chat.tokenizer) == ["ok 🙂"]
    qwen_like_start = make_masker(chat).mask([Message("user", "x"), Message("assistant", "🙂 ok")])
    assert trained_segments(qwen_like_start, chat.tokenizer) == ["🙂 ok<|im_end|>"]


def test_turn_without_special_end_strips_trailing_whitespace_on_both_paths(tmp_path):
    template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}"
        "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
    )
    chat = load_chat_tokenizer(build_tokenizer(tmp_path / "tok", chat_template=template))
    masker = make_masker(chat)
    messages = [Message("user", "q"), Message("assistant", "the answer  ")]
    text = masker.template.render(messages)
    fast = masker.turns._spans_from_skeleton(messages, text, [1])
    slow = [
        masker.turns._trained_span(text, *bounds)
        for bounds in masker.turns._bounds_from_prefixes(messages, text, [1])
    ]
    assert fast == slow
    assert text[fast[0][0] : fast[0][1]] == "the answer"


# --- the batch path (prepare's): the same examples as one by one ---------------------------------

TRICKY_CONTENTS = [
    "plain words",
    "¿Qué tal? 日本語 🙂",
    "🙂",
    "ends on an emoji 🙂",
    "e\u0301 is not NFC",
    "  spaces around  ",
    "\n\nnewlines\n",
    "tab\tand\r\nCRLF",
    "<|im_end|> and <|im_start|>user inside",
    "",
    "x" * 300,
]


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("policy", [{}, {"train_on_eos": False, "loss_on": "last-assistant"}])
@pytest.mark.parametrize("byte_positions", [True, False])
def test_batch_path_gives_exactly_what_offsets_give(chat_tokenizers, style, policy, byte_positions):
    conversations = [
        [Message("user", question), Message("assistant", answer)]
        for question in TRICKY_CONTENTS[:5]
        for answer in TRICKY_CONTENTS
    ]
    conversations += [
        [Message("system", answer), *TWO_TURNS[1:3], Message("user", answer), TWO_TURNS[4]]
        for answer in TRICKY_CONTENTS
    ]
    masker = make_masker(chat_tokenizers[style], **policy)
    if not byte_positions:  # as for a tokenizer that is not byte-level BPE
        masker._token_bytes = None
    assert_batch_matches_single(masker, conversations)


@pytest.mark.parametrize("overlong", ["drop", "truncate-oldest"])
def test_batch_path_truncates_and_rejects_as_single(chat_tokenizers, overlong):
    masker = make_masker(chat_tokenizers["chatml"])
    conversations = [_long_conversation(turns) for turns in (1, 2, 3, 4)]
    conversations.append([Message("user", "hi"), Message("assistant", "x", train=False)])
    max_length = len(masker.mask(_long_conversation(2)).input_ids)
    assert_batch_matches_single(masker, conversations, max_length, overlong)
    # A batch in which nothing survives.
    assert_batch_matches_single(masker, conversations[2:], 5, overlong)


def _ranges_by_the_helpers(encoding, spans):
    """The trained token ranges as the edge helpers alone find them (no shortcut)."""
    ranges, boundary = [], 0
    for start, end in spans:
        first, straddles_start = first_token_at_or_after(encoding, start, end)
        last, straddles_end = last_token_before(encoding, start, end)
        if first is not None and last is not None and first <= last:
            ranges.append((first, last))
            boundary += straddles_start + straddles_end
    return ranges, boundary


@pytest.mark.parametrize("style", sorted(STYLES))
def test_the_usual_span_shortcut_finds_what_the_helpers_find(chat_tokenizers, style):
    chat = chat_tokenizers[style]
    masker = make_masker(chat)
    texts = [
        masker.template.render([Message("user", "q"), Message("assistant", a)])
        for a in TRICKY_CONTENTS
    ]
    for text in texts:
        encoding = chat.tokenizer.encode(text, add_special_tokens=False)
        # Every span edge at every character, not only the template's: straddles included.
        spans_to_try = [
            [(start, end)]
            for start in range(len(text))
            for end in range(start, min(len(text), start + 12) + 1)
        ]
        for spans in spans_to_try:
            assert trained_token_ranges(encoding, spans) == _ranges_by_the_helpers(
                encoding, spans
            ), (text, spans)
