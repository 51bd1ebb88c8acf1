"""tiktoken's BPE core against `tokenizers`: the same ids wherever `fast_bpe_for` builds it,
a reason wherever it does not, and the tokenizer's own ids wherever it still differs."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import random
import unicodedata

import pytest
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from megasft.data.encode import IdsEncoder
from megasft.data.fast_bpe import FastBPE, fast_bpe_for
from megasft.data.token_bytes import byte_level_vocabulary
from megasft.data.tokenizer import load_chat_tokenizer
from megasft.demo.tokenizer import (
    CHATML_SPECIAL_TOKENS,
    DEFAULT_CORPUS,
    build_tokenizer,
    train_bpe,
)
from tests.conftest import shared_path

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The pre-tokenizer regex of Qwen2 and Qwen2.5."""

NON_ASCII = [
    "café",
    "naïve",
    "Ångström",
    "straße",
    "Ελληνικά",
    "日本語",
    "中文字",
    "한국어",
    "🙂",
    "👍🏽",
    "—",
    "«quoted»",
    "…",
    "\u00a0",  # no-break space
    "\u3000",  # ideographic space
]
"""All NFC-normal, as `prepare` sends them."""
NFD_TEXTS = ["cafe\u0301 au lait", "A\u030angstro\u0308m and more", "\u212b alone"]
"""Texts NFC changes: IdsEncoder must send them through the normalizer."""
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "\u2019s"]
RUN_ALPHABETS = [" ", "\n", " \n", " \t\r\n", ".,;:!?-_#()[]{}'\"*/+=<>|", ".\n !"]
"""What runs of 1 to 20 characters are drawn from: whitespace, punctuation and both."""
WORDS = DEFAULT_CORPUS.split()

SYSTEM_PROMPT = "You are a helpful assistant."


def _expected(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _first_difference(tokenizer: Tokenizer, fast: FastBPE, texts: list[str]):
    """(text, tokenizer's ids, tiktoken's ids) of the first text where they differ; None
    where there is none (a plain list comparison would print thousands of texts)."""
    expected = _expected(tokenizer, texts)
    got = fast.encode(texts)
    for text, want, have in zip(texts, expected, got, strict=True):
        if want != have:
            return text, want, have
    return None


def _random_piece(rng: random.Random, special_tokens: list[str]) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(WORDS)
    if kind == 1:
        return "".join(rng.choices(rng.choice(RUN_ALPHABETS), k=rng.randint(1, 20)))
    if kind == 2:
        return str(rng.randrange(10 ** rng.randint(1, 12)))
    if kind == 3:
        return rng.choice(CONTRACTIONS)
    if kind == 4:
        return rng.choice(NON_ASCII)
    return rng.choice(special_tokens)


def _random_texts(count: int, special_tokens: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(
            _random_piece(rng, special_tokens) + rng.choice(["", "", " ", "\n"])
            for _ in range(rng.randint(1, 12))
        )
        for _ in range(count)
    ]


def _token_texts(tokenizer: Tokenizer) -> list[str]:
    """Every token of the vocabulary (added ones too) whose bytes are valid UTF-8, as text."""
    spellings = byte_level_vocabulary(tokenizer.get_vocab())
    assert spellings is not None, "not a byte-level vocabulary"
    texts = []
    for spelling in spellings:
        # Not for a piece of a multi-byte character: no text holds it alone.
        with contextlib.suppress(UnicodeDecodeError):
            texts.append(spelling.decode("utf-8"))
    return texts


def _concatenations(pieces: list[str], count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(pieces, k=rng.randint(2, 6))) for _ in range(count)]


def _nfc_normal(texts: list[str]) -> list[str]:
    return [text for text in texts if unicodedata.is_normalized("NFC", text)]


def _copy(tokenizer: Tokenizer) -> Tokenizer:
    return Tokenizer.from_str(tokenizer.to_str())


# ---- Tiny tokenizers trained here --------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_style() -> Tokenizer:
    """ByteLevel with GPT-2's regex, no normalizer."""
    return train_bpe([DEFAULT_CORPUS], CHATML_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def qwen_style() -> Tokenizer:
    """As Qwen2.5's tokenizer.json: NFC, then Qwen's regex, then ByteLevel without its own."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The non-ASCII words too, so that some merges join the bytes of one character.
    tokenizer.train_from_iterator([DEFAULT_CORPUS, " ".join(NON_ASCII * 3)], trainer=trainer)
    return tokenizer


def _eligible(tokenizer: Tokenizer) -> FastBPE:
    fast = fast_bpe_for(json.loads(tokenizer.to_str()))
    assert isinstance(fast, FastBPE), fast
    return fast


def _tiny_texts(tokenizer: Tokenizer) -> list[str]:
    """Random mixed text, every token alone, and random runs of 2 to 6 tokens."""
    tokens = _token_texts(tokenizer)
    return [
        *_random_texts(2000, list(CHATML_SPECIAL_TOKENS)),
        *tokens,
        *_concatenations(tokens, 2000),
    ]


def test_gpt2_style_tokenizer_gives_the_ids_of_encode_batch(gpt2_style):
    texts = _tiny_texts(gpt2_style)
    assert _first_difference(gpt2_style, _eligible(gpt2_style), texts) is None


def test_qwen_style_tokenizer_gives_the_ids_of_encode_batch_on_nfc_text(qwen_style):
    """Compared with the NFC normalizer in place: on NFC-normal text it changes nothing."""
    texts = _nfc_normal(_tiny_texts(qwen_style))
    assert any(not text.isascii() for text in texts)
    assert _first_difference(qwen_style, _eligible(qwen_style), texts) is None


def test_ids_encoder_with_tiktoken_on_mixed_nfc_and_nfd_text(qwen_style):
    """NFD texts go through the tokenizer and its normalizer, the rest through tiktoken; the
    ids are encode_batch's, and tiktoken is kept (it never differed)."""
    fast = _eligible(qwen_style)
    texts = _random_texts(200, list(CHATML_SPECIAL_TOKENS), seed=1)
    rng = random.Random(2)
    for nfd in NFD_TEXTS:
        texts.insert(rng.randrange(1, len(texts)), nfd)
    texts.insert(1, unicodedata.normalize("NFD", "Ångström café"))
    assert 0 < len(_nfc_normal(texts)) < len(texts)
    encoder = IdsEncoder(qwen_style, fast)
    assert encoder(texts) == _expected(qwen_style, texts)
    assert encoder(NFD_TEXTS) == _expected(qwen_style, NFD_TEXTS)
    assert encoder.fast is fast


# ---- Tokenizers it must refuse -------------------------------------------------------------


def _sentencepiece_style(_base: Tokenizer) -> dict:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(special_tokens=list(CHATML_SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator([DEFAULT_CORPUS], trainer=trainer)
    return json.loads(tokenizer.to_str())


def _wordpiece(_base: Tokenizer) -> dict:
    """Byte-level pre-tokenization, so that only the model is wrong."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.WordPieceTrainer(special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator([DEFAULT_CORPUS], trainer=trainer)
    return json.loads(tokenizer.to_str())


def _with_dropout(base: Tokenizer) -> dict:
    tokenizer = _copy(base)
    tokenizer.model.dropout = 0.1
    return json.loads(tokenizer.to_str())


def _lowercase(base: Tokenizer) -> dict:
    tokenizer = _copy(base)
    tokenizer.normalizer = normalizers.Lowercase()
    return json.loads(tokenizer.to_str())


def _prefix_space(base: Tokenizer) -> dict:
    tokenizer = _copy(base)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return json.loads(tokenizer.to_str())


def _rstrip_token(base: Tokenizer) -> dict:
    tokenizer = _copy(base)
    tokenizer.add_special_tokens([AddedToken("<sep>", rstrip=True)])
    return json.loads(tokenizer.to_str())


def _nested_tokens(base: Tokenizer) -> dict:
    tokenizer = _copy(base)
    tokenizer.add_special_tokens(["<|im_start|>x"])  # holds <|im_start|>
    return json.loads(tokenizer.to_str())


def _swapped_merges(base: Tokenizer) -> dict:
    spec = json.loads(base.to_str())
    merges = spec["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    return spec


def _reversed_merges(base: Tokenizer) -> dict:
    spec = json.loads(base.to_str())
    spec["model"]["merges"].reverse()
    return spec


INELIGIBLE = {
    "sentencepiece-style": (_sentencepiece_style, "pre-tokenizer"),
    "wordpiece": (_wordpiece, "WordPiece"),
    "bpe-dropout": (_with_dropout, "dropout"),
    "lowercase": (_lowercase, "Lowercase"),
    "add-prefix-space": (_prefix_space, "pre-tokenizer"),
    "rstrip-token": (_rstrip_token, "strips whitespace"),
    "token-holding-another": (_nested_tokens, "holds another"),
    "swapped-merges": (_swapped_merges, "ranked"),
    "reversed-merges": (_reversed_merges, "ranked"),
}


def test_a_text_tiktoken_gives_up_on_goes_to_the_tokenizer(qwen_style):
    """A million spaces overflow the backtracking stack of tiktoken's regex engine (the
    lookahead in `\\s+(?!\\S)`): that text alone is encoded by the tokenizer, and tiktoken
    stays in use for the others."""
    fast = _eligible(qwen_style)
    spaces = " " * 1_000_000 + "x"
    assert fast.encode([spaces, "fine"])[0] is None
    texts = ["<|im_start|>user\nhello there<|im_end|>", spaces, "and the rest"]
    encoder = IdsEncoder(qwen_style, fast)
    assert encoder(texts) == _expected(qwen_style, texts)
    assert encoder.fast is fast


@pytest.mark.parametrize("spec_of, cause", INELIGIBLE.values(), ids=INELIGIBLE.keys())
def test_ineligible_tokenizers_get_a_reason(gpt2_style, spec_of, cause):
    reason = fast_bpe_for(spec_of(gpt2_style))
    assert isinstance(reason, str), reason
    assert cause in reason
    assert len(reason) < 100, "one short sentence"


# ---- Where tiktoken still differs ------------------------------------------------------------


def test_ids_encoder_gives_up_tiktoken_at_the_first_difference(qwen_style, caplog):
    """A FastBPE built from a tokenizer.json whose regex is not the tokenizer's: the check
    catches it, the ids are the tokenizer's, and it is not used again.

    It differs on every text here, so the check finds it whichever text it compares."""
    spec = json.loads(qwen_style.to_str())
    split = spec["pre_tokenizer"]["pretokenizers"][0]
    assert split["pattern"]["Regex"] == QWEN_PATTERN
    split["pattern"]["Regex"] = r"\S+|\s+"  # a space before a word is a piece of its own
    wrong_fast = fast_bpe_for(spec)
    assert isinstance(wrong_fast, FastBPE), wrong_fast
    texts = [f"How many apples does Tom have? {i} apples, {i} times." for i in range(10)]
    texts += ["The quick brown fox jumps over the lazy dog.<|im_end|>", "Tom's café: 日本語 🙂"]
    expected = _expected(qwen_style, texts)
    assert all(
        wrong != right for wrong, right in zip(wrong_fast.encode(texts), expected, strict=True)
    )

    encoder = IdsEncoder(qwen_style, wrong_fast)
    with caplog.at_level(logging.WARNING, logger="megasft.data.encode"):
        assert encoder(texts) == expected
    assert encoder.fast is None
    assert any("tiktoken" in record.getMessage() for record in caplog.records)
    assert encoder(texts[:3]) == expected[:3]


# ---- The real Qwen2.5 tokenizer (../shared; skipped where absent) -------------------------------

# Full sizes, not trimmed: all the Qwen tests together take about 10 s on 2 cores.
QWEN_CONCATENATIONS = 20_000
CODE_POINTS_PER_TEXT = 64


@pytest.fixture(scope="module")
def qwen_fast() -> FastBPE:
    path = shared_path("data", "tokenizers", "qwen2.5") / "tokenizer.json"
    fast = fast_bpe_for(json.loads(path.read_text(encoding="utf-8")))
    assert isinstance(fast, FastBPE), fast
    return fast


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    """Qwen2.5's tokenizer with its NFC normalizer set aside, as IdsEncoder does for the
    NFC-normal texts it sends to tiktoken."""
    path = shared_path("data", "tokenizers", "qwen2.5") / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    assert isinstance(tokenizer.normalizer, normalizers.NFC)
    tokenizer.normalizer = None
    return tokenizer


@pytest.fixture(scope="module")
def qwen_tokens(qwen) -> list[str]:
    """Every token of Qwen2.5's vocabulary that is valid UTF-8 and NFC-normal, as text."""
    return _nfc_normal(_token_texts(qwen))


def test_qwen_on_gsm8k_rendered_as_chatml(qwen, qwen_fast):
    path = shared_path("data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    texts = _nfc_normal(
        [
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{row['question']}<|im_end|>\n"
            f"<|im_start|>assistant\n{row['answer']}<|im_end|>\n"
            for row in rows
        ]
    )
    assert len(texts) == len(rows) > 1000
    assert _first_difference(qwen, qwen_fast, texts) is None


def test_qwen_on_every_token_alone(qwen, qwen_fast, qwen_tokens):
    assert len(qwen_tokens) > 100_000
    assert _first_difference(qwen, qwen_fast, qwen_tokens) is None


def test_qwen_on_random_concatenations_of_tokens(qwen, qwen_fast, qwen_tokens):
    texts = _nfc_normal(_concatenations(qwen_tokens, QWEN_CONCATENATIONS))
    assert _first_difference(qwen, qwen_fast, texts) is None


@pytest.mark.parametrize("separator", ["", " "], ids=["plain", "spaced"])
def test_qwen_on_every_code_point(qwen, qwen_fast, separator):
    """Every code point but the surrogates (no UTF-8 holds them) and the 1,120 that NFC
    changes on their own, 64 to a text; the few texts NFC would still change (combining
    marks out of canonical order) are left out."""
    characters = [
        chr(c)
        for c in range(0x110000)
        if not 0xD800 <= c <= 0xDFFF and unicodedata.is_normalized("NFC", chr(c))
    ]
    blocks = [
        separator.join(characters[start : start + CODE_POINTS_PER_TEXT])
        for start in range(0, len(characters), CODE_POINTS_PER_TEXT)
    ]
    texts = _nfc_normal(blocks)
    assert len(texts) > 0.99 * len(blocks)
    assert _first_difference(qwen, qwen_fast, texts) is None


# ---- ChatTokenizer.fast_bpe --------------------------------------------------------------


def test_chat_tokenizer_builds_fast_bpe_once_and_not_into_its_pickle(tmp_path):
    chat_tokenizer = load_chat_tokenizer(build_tokenizer(tmp_path))
    fast = chat_tokenizer.fast_bpe()
    assert isinstance(fast, FastBPE), fast
    assert chat_tokenizer.fast_bpe() is fast

    restored = pickle.loads(pickle.dumps(chat_tokenizer))
    assert restored._fast_bpe is None
    rebuilt = restored.fast_bpe()
    assert isinstance(rebuilt, FastBPE) and rebuilt is not fast
    texts = _random_texts(50, list(CHATML_SPECIAL_TOKENS))
    assert rebuilt.encode(texts) == fast.encode(texts) == _expected(restored.tokenizer, texts)
