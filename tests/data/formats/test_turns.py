"""What messages and ShareGPT share: per-message training flags."""

from __future__ import annotations

import pytest

from megasft.data.conversation import Message
from tests.data.formats.conftest import A, U, convert, error_for, rejected


@pytest.mark.parametrize(
    "flags, train",
    [
        ({}, True),
        ({"train": True}, True),
        ({"train": False}, False),
        ({"loss_weight": 1}, True),
        ({"loss_weight": 1.0}, True),
        ({"loss_weight": 0}, False),
        ({"loss_weight": 0.0}, False),
        ({"train": None, "loss_weight": None}, True),  # Parquet's nulls for absent fields
        ({"train": False, "loss_weight": 0}, False),
    ],
)
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_per_message_train_flags(flags, train, fmt):
    if fmt == "messages":
        turns = [{"role": U, "content": "q", **flags}, {"role": A, "content": "a", **flags}]
        record = {"messages": turns}
    else:
        turns = [{"from": "human", "value": "q", **flags}, {"from": "gpt", "value": "a", **flags}]
        record = {"conversations": turns}
    assert convert(record, fmt) == [Message(U, "q", train), Message(A, "a", train)]


@pytest.mark.parametrize(
    "flags, field, reason",
    [
        ({"loss_weight": 0.5}, "messages[1].loss_weight", "unsupported_loss_weight"),
        ({"loss_weight": 2}, "messages[1].loss_weight", "unsupported_loss_weight"),
        ({"loss_weight": "0"}, "messages[1].loss_weight", "wrong_type"),
        ({"loss_weight": True}, "messages[1].loss_weight", "wrong_type"),
        ({"train": "no"}, "messages[1].train", "wrong_type"),
        ({"train": 0}, "messages[1].train", "wrong_type"),
        ({"train": True, "loss_weight": 0}, "messages[1]", "conflicting_train_flags"),
    ],
)
def test_bad_train_flags(flags, field, reason):
    record = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a", **flags}]}
    assert rejected(record) == (field, reason)


def test_unsupported_loss_weight_says_what_is_supported():
    record = {
        "messages": [{"role": U, "content": "q"}, {"role": A, "content": "a", "loss_weight": 0.5}]
    }
    assert "only 0" in error_for(record).message
