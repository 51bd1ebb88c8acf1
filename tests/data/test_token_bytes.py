"""Token positions from the tokens' bytes: exact where the ids spell the text, refused else."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from megasft.data.token_bytes import TokenBytes
from megasft.demo.tokenizer import CHATML_SPECIAL_TOKENS, DEFAULT_CORPUS, train_bpe

TEXTS = [
    "<|im_start|>user\nHow many apples? 3 + 5 = 8<|im_end|>\n",
    "¿Qué tal? 日本語 🙂 ends on an emoji 🙂",
    "  spaces, tabs\tand\r\nnewlines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe([DEFAULT_CORPUS], CHATML_SPECIAL_TOKENS)


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids


def _spells(token_bytes: TokenBytes, ids: list[int], text: bytes) -> bool:
    return bool(_locate(token_bytes, ids, text)[1][0])


def _locate(token_bytes: TokenBytes, ids: list[int], text: bytes):
    return token_bytes.locate(np.asarray(ids, np.int32), np.asarray([len(ids)]), [text])


@pytest.mark.parametrize("text", TEXTS)
def test_token_starts_are_the_offsets_of_the_tokenizer(tokenizer, text):
    token_bytes = TokenBytes.for_tokenizer(tokenizer)
    ids = _ids(tokenizer, text)
    encoded = text.encode("utf-8")
    lengths, spelled = _locate(token_bytes, ids, encoded)
    assert spelled.tolist() == [True]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    # Offsets are characters: where a character starts, count its bytes.
    char_of_byte = [i for i, c in enumerate(text) for _ in c.encode("utf-8")]
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    assert [char_of_byte[start] for start in starts] == [start for start, _ in offsets]
    assert int(lengths.sum()) == len(encoded)


def test_many_texts_at_once_each_judged_alone(tokenizer):
    token_bytes = TokenBytes.for_tokenizer(tokenizer)
    texts = [text.encode() for text in TEXTS]
    id_lists = [_ids(tokenizer, text) for text in TEXTS]
    id_lists[1] = id_lists[1][:-1]  # one token short: the text is longer than its tokens
    id_lists[2][0], id_lists[2][1] = id_lists[2][1], id_lists[2][0]  # same bytes, wrong order
    ids = np.asarray([i for ids in id_lists for i in ids], np.int32)
    counts = np.asarray([len(ids) for ids in id_lists])
    _, spelled = token_bytes.locate(ids, counts, texts)
    assert spelled.tolist() == [True, False, id_lists[2][0] == id_lists[2][1]]


def test_ids_of_another_text_do_not_spell_it(tokenizer):
    token_bytes = TokenBytes.for_tokenizer(tokenizer)
    ids = _ids(tokenizer, "hello world")
    assert not _spells(token_bytes, ids, b"hello world!")
    assert not _spells(token_bytes, ids, b"hello_world")
    assert not _spells(token_bytes, ids[::-1], b"hello world")


def test_a_text_the_normalizer_changes_is_not_spelled(tokenizer):
    nfc = Tokenizer.from_str(tokenizer.to_str())
    nfc.normalizer = normalizers.NFC()
    token_bytes = TokenBytes.for_tokenizer(nfc)
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert _spells(token_bytes, _ids(nfc, composed), composed.encode())
    # NFC turns e + combining accent into é: the tokens spell é, not the text.
    assert not _spells(token_bytes, _ids(nfc, decomposed), decomposed.encode())


def test_an_added_token_that_takes_the_space_before_it_is_not_spelled(tokenizer):
    stripping = Tokenizer.from_str(tokenizer.to_str())
    stripping.add_tokens([AddedToken("<x>", lstrip=True)])
    token_bytes = TokenBytes.for_tokenizer(stripping)
    assert _spells(token_bytes, _ids(stripping, "a<x>"), b"a<x>")
    assert not _spells(token_bytes, _ids(stripping, "a <x>"), b"a <x>")


def test_only_byte_level_bpe_and_normalizers_that_keep_normalized_text(tokenizer):
    lowercase = Tokenizer.from_str(tokenizer.to_str())
    lowercase.normalizer = normalizers.Lowercase()
    assert TokenBytes.for_tokenizer(lowercase) is None
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    assert TokenBytes.for_tokenizer(metaspace) is None
    word_level = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    word_level.decoder = decoders.ByteLevel()
    assert TokenBytes.for_tokenizer(word_level) is None
    assert TokenBytes.for_tokenizer(tokenizer) is not None
