"""Token ids at less cost than encode_batch: always the same ids."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers

from megasft.data.encode import MIN_TEXTS_TO_SHARE, IdsEncoder
from megasft.demo.tokenizer import CHATML_SPECIAL_TOKENS, DEFAULT_CORPUS, train_bpe
from tests.conftest import shared_path

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>"
"""The opening ChatML templates render before the user's turn, with a default system prompt."""


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe([DEFAULT_CORPUS], CHATML_SPECIAL_TOKENS)


def _expected(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


MIXED_FORMS = [
    "plain ASCII <|im_end|>",
    "caf\u00e9 composed, \u00c5ngstr\u00f6m",  # NFC, not NFD
    "cafe\u0301 decomposed",  # NFD, not NFC
    "\ufb01ne ligature \u2460",  # changed by NFKC and NFKD only
    "\u212b the angstrom sign",  # changed by every form
]


@pytest.mark.parametrize("normalizer", [None, "NFC", "NFD", "NFKC", "NFKD", "Lowercase"])
def test_ids_encoder_gives_the_ids_of_encode_batch(tokenizer, normalizer):
    """With or without the normalizer set aside, batch by batch: the same ids as the
    tokenizer's own encode_batch, and the normalizer back in place after."""
    normalized = Tokenizer.from_str(tokenizer.to_str())
    if normalizer is not None:
        normalized.normalizer = getattr(normalizers, normalizer)()
    before = normalized.to_str()
    encode = IdsEncoder(normalized)
    batches = [MIXED_FORMS[:1], MIXED_FORMS[:2], MIXED_FORMS, *[[text] for text in MIXED_FORMS]]
    for batch in batches:
        expected = [e.ids for e in normalized.encode_batch(batch, add_special_tokens=False)]
        assert encode(batch) == expected, batch
    assert normalized.to_str() == before


def test_ids_encoder_restores_the_normalizer_when_encoding_fails(tokenizer):
    nfc = Tokenizer.from_str(tokenizer.to_str())
    nfc.normalizer = normalizers.NFC()
    with pytest.raises(TypeError):
        IdsEncoder(nfc)(["fine", "a lone surrogate \ud800"])  # NFC, but no valid UTF-8
    assert isinstance(nfc.normalizer, normalizers.NFC)


def test_ids_encoder_on_the_real_qwen_tokenizer():
    """Qwen2.5's NFC normalizer set aside on GSM8K and on multilingual text: the same ids."""
    directory = shared_path("data", "tokenizers", "qwen2.5")
    qwen = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert isinstance(qwen.normalizer, normalizers.NFC)
    gsm8k = shared_path("data", "gsm8k", "test.jsonl")
    texts = [*MIXED_FORMS, "日本語のテキスト、한국어 텍스트, Ελληνικά, العربية"]
    texts += gsm8k.read_text(encoding="utf-8").splitlines()[:200]
    expected = [e.ids for e in qwen.encode_batch(texts, add_special_tokens=False)]
    encode = IdsEncoder(qwen)
    assert [encode([text])[0] for text in texts] == expected
    ascii_or_nfc = [text for text in texts if "\u0301" not in text and "\u212b" not in text]
    assert encode(ascii_or_nfc) == [expected[texts.index(text)] for text in ascii_or_nfc]
    # Rendered conversations: the shared opening (up to the user turn's header) cut off.
    rendered = [SYSTEM + f"user\n{text}<|im_end|>\n" for text in texts]
    assert encode._shared_opening(rendered)[0] == SYSTEM
    assert encode(rendered) == _expected(qwen, rendered)
    assert encode._boundaries


def _conversations(count: int, opening: str) -> list[str]:
    return [
        f"{opening}user\nWhat is {i} + {i}?<|im_end|>\n<|im_start|>assistant\n{2 * i}<|im_end|>\n"
        for i in range(count)
    ]


@pytest.mark.parametrize(
    "opening",
    [
        SYSTEM,
        "",  # nothing shared
        "<|im_start|>system\nYou are",  # shared text that ends inside a piece: cut before it
        "  <|im_start|>",  # whitespace before the boundary token
        SYSTEM + "user\nWhat is 1",  # shared beyond the last boundary token
    ],
)
@pytest.mark.parametrize("normalizer", [None, "NFC"])
def test_a_shared_opening_is_encoded_once_and_the_ids_are_those_of_the_whole(
    tokenizer, opening, normalizer
):
    tok = Tokenizer.from_str(tokenizer.to_str())
    if normalizer:
        tok.normalizer = getattr(normalizers, normalizer)()
    texts = _conversations(MIN_TEXTS_TO_SHARE + 3, opening)
    encoder = IdsEncoder(tok)
    opening_found, boundary = encoder._shared_opening(texts)
    if "<|im_start|>" in opening:
        assert opening_found.endswith("<|im_start|>") and boundary is not None
    assert encoder(texts) == _expected(tok, texts)
    assert encoder._boundaries, "the cut held: still in use"
    short = texts[: MIN_TEXTS_TO_SHARE - 1]
    assert encoder._shared_opening(short) == ("", None)
    assert encoder(short) == _expected(tok, short)


def test_no_cut_after_tokens_that_look_at_their_neighbours(tokenizer):
    """A token that strips whitespace or needs a word boundary, or one another holds."""
    stripping = Tokenizer.from_str(tokenizer.to_str())
    stripping.add_special_tokens([AddedToken("<sep>", rstrip=True)])
    assert "<sep>" not in IdsEncoder(stripping)._boundaries
    texts = [f"<sep>  item {i}" for i in range(MIN_TEXTS_TO_SHARE)]
    assert IdsEncoder(stripping)(texts) == _expected(stripping, texts)

    nested = Tokenizer.from_str(tokenizer.to_str())
    nested.add_special_tokens(["<|im_start|>x"])  # holds <|im_start|>
    assert IdsEncoder(nested)._boundaries == {}
    texts = [f"<|im_start|>x{i}" for i in range(MIN_TEXTS_TO_SHARE)]
    assert IdsEncoder(nested)(texts) == _expected(nested, texts)


def test_a_tokenizer_where_the_cut_does_not_hold_falls_back_for_good():
    """Metaspace with prepend_scheme "first" marks the start of a text's first piece only:
    the part after the cut would be marked where the whole text is not."""
    first = Tokenizer(models.BPE())
    first.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    special = ["<|im_start|>", "<|im_end|>"]
    first.train_from_iterator([DEFAULT_CORPUS], trainers.BpeTrainer(special_tokens=special))
    texts = _conversations(MIN_TEXTS_TO_SHARE, SYSTEM)
    encoder = IdsEncoder(first)
    assert set(encoder._boundaries) == set(special)
    assert encoder(texts) == _expected(first, texts)
    assert encoder._boundaries == {}, "found out on the first batch, not tried again"
    assert encoder(texts) == _expected(first, texts)
