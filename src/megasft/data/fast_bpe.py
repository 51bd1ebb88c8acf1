"""tiktoken's BPE core for the byte-level BPE tokenizers it reproduces id for id.

`fast_bpe_for(spec)` builds the encoder from a tokenizer.json only where the file shows that
tiktoken and `tokenizers` agree (Qwen2, Qwen2.5, Qwen3, Llama 3, GPT-2 style); what the file
cannot show is checked as the encoder runs (`IdsEncoder`, token_bytes.py). The conditions, why
they suffice, and the measured gain: docs/prepare.md, "Encoding fast".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from megasft.data.token_bytes import NORMAL_FORMS, byte_level_vocabulary

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The regex of `ByteLevel(use_regex=True)`: GPT-2's, as `tokenizers` spells it."""

_NORMAL_FORM_TYPES = set(NORMAL_FORMS.values())


@dataclass(frozen=True)
class FastBPE:
    """`encoder.encode(texts)` -> ids; only for text the tokenizer's normalizer leaves alone
    and that is valid UTF-8 (see `IdsEncoder`)."""

    encoding: object
    """A `tiktoken.Encoding`."""
    added_tokens: frozenset[str]

    def encode(self, texts: list[str]) -> list[list[int] | None]:
        """The ids of each text.

        Args:
            texts: the texts (with added tokens matched as they are).

        Returns:
            Per text, its ids, or None for a text tiktoken's regex engine gives up on (a run of a
            million spaces overflows its backtracking stack), for the caller to encode another way.
        """
        return [self._encode_one(text) for text in texts]

    def _encode_one(self, text: str) -> list[int] | None:
        try:
            return self.encoding.encode(
                text, allowed_special=self.added_tokens, disallowed_special=()
            )
        except ValueError:
            return None


def fast_bpe_for(spec: dict) -> FastBPE | str:
    """The encoder for a parsed tokenizer.json, or why there is none.

    Args:
        spec: the parsed tokenizer.json.

    Returns:
        The encoder, or a sentence saying why tiktoken cannot reproduce this tokenizer.
    """
    try:
        import tiktoken
    except ImportError:
        return "tiktoken is not installed"
    pattern = _pre_tokenizer_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return "its pre-tokenizer is not a single regex followed by byte-level"
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in _NORMAL_FORM_TYPES:
        return f"its normalizer ({normalizer.get('type')}) may change text"
    model = spec.get("model") or {}
    why_not = _model_problem(model)
    if why_not:
        return why_not
    ranks = byte_level_vocabulary(model["vocab"])
    if ranks is None:
        return "its vocabulary is not byte-level"
    if len(ranks) != len(model["vocab"]) or len(set(ranks.values())) != len(ranks):
        return "two vocabulary entries share bytes or an id"
    if any(bytes([byte]) not in ranks for byte in range(256)):
        return "its vocabulary lacks some of the 256 bytes"
    added = spec.get("added_tokens") or []
    why_not = _added_tokens_problem(added)
    if why_not:
        return why_not
    try:
        encoding = tiktoken.Encoding(
            name="megasft",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens={token["content"]: token["id"] for token in added},
        )
    except Exception as error:  # a regex tiktoken's engine rejects, say
        return f"tiktoken cannot build it: {error}"
    return FastBPE(encoding, frozenset(token["content"] for token in added))


def _pre_tokenizer_pattern(pre_tokenizer: dict | None) -> str | None:
    """The one regex that splits text into the pieces BPE sees; None for anything else."""
    if pre_tokenizer is None:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        if pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space"):
            return GPT2_PATTERN
        return None
    if pre_tokenizer.get("type") != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or "Regex" not in (split.get("pattern") or {})
        or split.get("behavior") != "Isolated"
        or split.get("invert")
    ):
        return None
    if (
        byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    return split["pattern"]["Regex"]


def _model_problem(model: dict) -> str | None:
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("byte_fallback"):
        return "its BPE uses dropout or byte fallback"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE marks word pieces"
    vocab = model.get("vocab") or {}
    merges = model.get("merges") or []
    if not merges:
        return None
    if isinstance(merges[0], str):  # the older "left right" form
        merges = [merge.split(" ", 1) for merge in merges]
    # In C loops (map): Qwen2.5 has 151k merges. -1 for a token not in the vocabulary.
    missing = itertools.repeat(-1)
    count = len(merges)
    made = np.fromiter(map(vocab.get, map("".join, merges), missing), np.int64, count=count)
    left = np.fromiter(map(vocab.get, map(itemgetter(0), merges), missing), np.int64, count=count)
    right = np.fromiter(map(vocab.get, map(itemgetter(1), merges), missing), np.int64, count=count)
    parts_first = np.all((left >= 0) & (right >= 0) & (made > left) & (made > right))
    if not (parts_first and np.all(np.diff(made) > 0)):
        return "its merges are not ranked by the ids of the tokens they make"
    return None


def _added_tokens_problem(added: list[dict]) -> str | None:
    for token in added:
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip"):
            return f"added token {token['content']!r} is normalized or strips whitespace"
        if token.get("single_word") or not token["content"]:
            return f"added token {token['content']!r} needs a word boundary or is empty"
    if may_hold_one_another([token["content"] for token in added]):
        return "an added token holds another (or there are too many to compare)"
    return None


MAX_ADDED_TOKENS_COMPARED = 1024
"""Above this many added tokens, `may_hold_one_another` does not compare them pair by pair."""


def may_hold_one_another(contents: list[str]) -> bool:
    """Whether one added token may lie inside another. Where none does, each is matched in a
    text on its own, at the same places whatever the text around it.

    Args:
        contents: the added tokens' texts.

    Returns:
        True where one may (always, above MAX_ADDED_TOKENS_COMPARED tokens).
    """
    return len(contents) > MAX_ADDED_TOKENS_COMPARED or any(
        inner != outer and inner in outer for inner in contents for outer in contents
    )
