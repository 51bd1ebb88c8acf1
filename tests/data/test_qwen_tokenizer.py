"""Against the real Qwen2.5 tokenizer and chat template in ../shared (skipped where absent)."""

from __future__ import annotations

import json

import pytest

from megasft.data.conversation import Message
from megasft.data.prepare import PrepareConfig, prepare
from megasft.data.tokenizer import load_chat_tokenizer
from tests.conftest import shared_path
from tests.data.conftest import assert_batch_matches_single, make_masker, trained_segments
from tests.data.test_masking import TRICKY_CONTENTS

CONVERSATIONS = [
    [Message("user", "What is 2 + 2?"), Message("assistant", "It is 4.")],
    [
        Message("system", "You answer in French."),
        Message("user", "Hello!"),
        Message("assistant", "Bonjour !"),
        Message("user", "Thanks, and 3 + 3?"),
        Message("assistant", " Six.\n"),
    ],
    [
        Message("user", "weather in Paris?"),
        Message("assistant", "Let me check."),
        Message("tool", '{"temp": 21}'),
        Message("assistant", "It is 21 °C — pleasant."),
    ],
]


@pytest.fixture(scope="module")
def qwen():
    return load_chat_tokenizer(shared_path("data", "tokenizers", "qwen2.5"))


def test_rendering_matches_transformers_apply_chat_template(qwen):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(qwen.path)
    for conversation in CONVERSATIONS:
        dicts = [{"role": m.role, "content": m.content} for m in conversation]
        for add_generation_prompt in (False, True):
            expected = reference.apply_chat_template(
                dicts, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert qwen.template.render(conversation, add_generation_prompt) == expected
        ids = reference(reference.apply_chat_template(dicts, tokenize=False))["input_ids"]
        assert make_masker(qwen).mask(conversation).input_ids.tolist() == list(ids)


def test_exact_trained_tokens(qwen):
    masker = make_masker(qwen)
    assert trained_segments(masker.mask(CONVERSATIONS[0]), qwen.tokenizer) == ["It is 4.<|im_end|>"]
    assert trained_segments(masker.mask(CONVERSATIONS[1]), qwen.tokenizer) == [
        "Bonjour !<|im_end|>",
        " Six.\n<|im_end|>",
    ]
    assert trained_segments(masker.mask(CONVERSATIONS[2]), qwen.tokenizer) == [
        "Let me check.<|im_end|>",
        "It is 21 °C — pleasant.<|im_end|>",
    ]
    no_eos = make_masker(qwen, train_on_eos=False, loss_on="last-assistant")
    assert trained_segments(no_eos.mask(CONVERSATIONS[1]), qwen.tokenizer) == [" Six.\n"]


def test_batch_path_gives_exactly_what_offsets_give(qwen):
    # Qwen normalizes to NFC: offsets of non-NFC content map back through the normalization.
    conversations = CONVERSATIONS + [
        [Message("user", question), Message("assistant", answer)]
        for question in TRICKY_CONTENTS[:5]
        for answer in TRICKY_CONTENTS
    ]
    for policy in ({}, {"train_on_eos": False, "loss_on": "last-assistant"}):
        assert_batch_matches_single(make_masker(qwen, **policy), conversations)


def test_gsm8k_train_packs_at_least_99_percent_at_4096(tmp_path, qwen):
    train = shared_path("data", "gsm8k", "train.jsonl")
    manifest = prepare(
        PrepareConfig(
            inputs=(str(train),),
            tokenizer=qwen.path,
            output=str(tmp_path / "gsm8k"),
            column_map=(("prompt", "question"), ("response", "answer")),
            seq_length=4096,
            val_fraction=0.0,
            workers=2,
            progress=False,
        )
    )
    rows = len(train.read_text(encoding="utf-8").splitlines())
    assert manifest["examples"] == rows and manifest["rejected"]["total"] == 0
    assert manifest["packing_efficiency"] >= 0.99
    written = json.loads((tmp_path / "gsm8k" / "manifest.json").read_text())
    assert written["packing_efficiency"] == manifest["packing_efficiency"]
