"""BOS and end-of-turn tokens at the edges of what the template renders: a BOS the tokenizer
adds (`add_bos_token`) where the template has none, and `--no-train-on-eos` with templates
whose turns end in a special token and nothing after it (Llama 3, Mistral)."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from megasft.data.tokenizer import load_chat_tokenizer
from megasft.demo.tokenizer import build_tokenizer
from tests.data.conftest import assert_batch_matches_single, make_masker, trained_segments
from tests.data.styles import MISTRAL, STYLES

TWO_TURNS = [
    Message("system", "Be brief."),
    Message("user", "What is 2 + 2?"),
    Message("assistant", "It is 4."),
    Message("user", "And 3 + 3?"),
    Message("assistant", "6"),
]


def test_add_bos_token_puts_the_bos_the_template_leaves_out(tmp_path):
    directory = build_tokenizer(
        tmp_path / "tok",
        chat_template=MISTRAL.replace("{{ bos_token }}", ""),
        special_tokens=("<unk>", "<s>", "</s>"),
        config={"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    )
    chat = load_chat_tokenizer(directory)
    bos_id = chat.tokenizer.token_to_id("<s>")
    assert not chat.template.render(TWO_TURNS).startswith("<s>")
    masker = make_masker(chat)
    example = masker.mask(TWO_TURNS)
    assert example.input_ids.tolist()[0] == bos_id
    assert example.input_ids.tolist().count(bos_id) == 1
    assert example.loss_mask.tolist()[0] == 0
    assert trained_segments(example, chat.tokenizer) == [" It is 4.</s>", " 6</s>"]
    assert_batch_matches_single(masker, [TWO_TURNS, TWO_TURNS[1:3]])


@pytest.mark.parametrize(
    ("style", "expected"),
    [("llama3", ["It is 4.", "6"]), ("mistral", [" It is 4.", " 6"])],
)
def test_no_train_on_eos_leaves_a_bare_special_end_of_turn_untrained(
    chat_tokenizers, style, expected
):
    chat = chat_tokenizers[style]
    masker = make_masker(chat, train_on_eos=False)
    example = masker.mask(TWO_TURNS)
    assert trained_segments(example, chat.tokenizer) == expected
    end_id = chat.tokenizer.token_to_id(STYLES[style].end_of_turn)
    ids, mask = example.input_ids.tolist(), example.loss_mask.tolist()
    assert ids.count(end_id) >= 2
    assert all(trained == 0 for token, trained in zip(ids, mask, strict=True) if token == end_id)
    assert_batch_matches_single(masker, [TWO_TURNS, TWO_TURNS[1:3]])
