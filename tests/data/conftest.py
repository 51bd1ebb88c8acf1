from __future__ import annotations

import numpy as np
import pytest

from megasft.data.masking import ConversationMasker, MaskedExample, MaskingError, MaskPolicy
from megasft.data.tokenizer import load_chat_tokenizer
from megasft.demo.tokenizer import build_tokenizer
from tests.data.styles import STYLES


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    """One tiny trained tokenizer directory per template style."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        name: build_tokenizer(
            root / name,
            chat_template=style.template,
            special_tokens=style.special_tokens,
            config=style.config,
            post_processor_bos=style.post_processor_bos,
        )
        for name, style in STYLES.items()
    }


@pytest.fixture(scope="session")
def chat_tokenizers(tokenizer_dirs):
    return {name: load_chat_tokenizer(path) for name, path in tokenizer_dirs.items()}


def make_masker(chat_tokenizer, **policy) -> ConversationMasker:
    return ConversationMasker(chat_tokenizer, MaskPolicy(**policy))


def as_example(row: dict) -> MaskedExample:
    """A row read back from a prepare output, in the shape the masker returns."""
    return MaskedExample(np.array(row["input_ids"]), np.array(row["loss_mask"]), 0)


def trained_segments(example, tokenizer) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    segments, run = [], []
    for token, trained in zip(example.input_ids.tolist(), example.loss_mask.tolist(), strict=True):
        if trained:
            run.append(token)
        elif run:
            segments.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    if run:
        segments.append(tokenizer.decode(run, skip_special_tokens=False))
    return segments


def mask_each(
    masker: ConversationMasker, conversations, max_length=None, overlong="drop"
) -> list[MaskedExample | MaskingError]:
    """`mask_many` (one encode call, masks set in flat arrays), one result per conversation."""
    batch = masker.mask_many(conversations, max_length, overlong)
    return [
        outcome if isinstance(outcome, MaskingError) else batch.example(outcome)
        for outcome in batch.outcomes
    ]


def assert_batch_matches_single(
    masker: ConversationMasker, conversations, max_length=None, overlong="drop"
) -> None:
    """`mask_many` gives, row for row, exactly what `mask` gives: ids, mask, boundary count,
    dropped turns, or the same rejection."""
    batch = mask_each(masker, conversations, max_length, overlong)
    for conversation, batched in zip(conversations, batch, strict=True):
        try:
            single = masker.mask(conversation, max_length, overlong)
        except MaskingError as error:
            assert isinstance(batched, MaskingError), conversation
            assert batched.reason == error.reason, conversation
            continue
        assert not isinstance(batched, MaskingError), (conversation, batched)
        assert batched.input_ids.tolist() == single.input_ids.tolist(), conversation
        assert batched.loss_mask.tolist() == single.loss_mask.tolist(), conversation
        assert batched.boundary_tokens == single.boundary_tokens, conversation
        assert batched.dropped_turns == single.dropped_turns, conversation
