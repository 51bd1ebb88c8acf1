"""Answer extractors: the final answer inside a model response or a reference, normalised.

GSM8K-style numeric answers, tried in this order on a response:

1. `#### N`: the first number after the last `####` (the GSM8K reference format);
2. `<answer>...</answer>`: the last number inside the last such tag (the format the seed
   recipes train for);
3. the last number anywhere in the text.

Numbers are normalised so that equal values compare equal as strings: a leading `$`, thousands
separators and spaces go, a trailing `.0`/`.50` loses its zeros (`18.50` -> `18.5`,
`1,000.00` -> `1000`), a trailing `%` or `.` is dropped, the Unicode minus is a minus, `-0` is `0`.

Text answers (`exact-match`) are normalised with NFKC, casefolding, trimmed and collapsed
whitespace, and without trailing sentence punctuation and surrounding quotes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# A number as people and models write it: an optional minus and $, digits with or without
# thousands separators (a separator must be followed by exactly three digits), optional
# decimals; or a bare decimal like .5. A minus right after a word or digit is a hyphen or a
# range ("3-5"), not a sign. The lookarounds keep `1,0000` from reading as `1,000`.
NUMBER_PATTERN = re.compile(
    r"(?<![\d.])(?:(?<![\w)])-)?\$?"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?!\d|,\d{3})"
)
HASH_ANSWER = re.compile(r"####(.*)")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})

METHODS = ("hash", "answer_tag", "last_number", "whole_response", "none")
"""How an answer was found: `#### N`, `<answer>N</answer>`, the last number, the whole
response (exact-match), or not at all."""


@dataclass(frozen=True, slots=True)
class Extraction:
    answer: str | None
    """The normalised answer, or None when the text holds none."""
    method: str
    """One of METHODS."""


def normalize_number(text: str) -> str | None:
    """The canonical string of the number `text` spells, or None when it is not one number.

    "1,000" -> "1000", "$18.00" -> "18", "18.50" -> "18.5", "-0" -> "0", "50%" -> "50".
    """
    cleaned = text.translate(_MINUS_SIGNS).strip().rstrip(".%").replace(",", "")
    cleaned = cleaned.replace("$", "").replace(" ", "")
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:  # unreachable after the fullmatch; kept as a guard
        return None
    if value == value.to_integral_value():
        return str(int(value))
    # normalize() strips trailing zeros; format "f" keeps it out of exponent notation.
    return format(value.normalize(), "f")


def numbers_in(text: str) -> list[str]:
    """Every number in `text`, in order, normalised."""
    text = text.translate(_MINUS_SIGNS)
    numbers = (normalize_number(match.group()) for match in NUMBER_PATTERN.finditer(text))
    return [number for number in numbers if number is not None]


def extract_number_answer(text: str) -> Extraction:
    """The numeric final answer of a response: `#### N`, else `<answer>`, else the last number."""
    hash_answers = HASH_ANSWER.findall(text)
    if hash_answers:
        numbers = numbers_in(hash_answers[-1])
        if numbers:
            return Extraction(numbers[0], "hash")
    tags = ANSWER_TAG.findall(text)
    if tags:
        numbers = numbers_in(tags[-1])
        if numbers:
            return Extraction(numbers[-1], "answer_tag")
    numbers = numbers_in(text)
    if numbers:
        return Extraction(numbers[-1], "last_number")
    return Extraction(None, "none")


def extract_gsm8k_reference(text: str) -> str | None:
    """The answer of a GSM8K reference: the number after `####`.

    References in the seed format (`<answer>N</answer>`) and references that are just a
    number are read too; anything else gives None (the caller reports the row), because a
    reference answer guessed from the last number of a worked solution could be wrong.
    """
    hash_answers = HASH_ANSWER.findall(text)
    if hash_answers:
        return normalize_number(hash_answers[-1])
    tags = ANSWER_TAG.findall(text)
    if tags:
        return normalize_number(tags[-1])
    return normalize_number(text)


def normalize_text(text: str) -> str:
    """Text compared by `exact-match`: NFKC, casefolded, whitespace collapsed, no trailing
    sentence punctuation or surrounding quotes."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    text = text.rstrip(".!?;: ")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def extract_text_answer(text: str) -> Extraction:
    """The answer of a response for `exact-match`: inside the last `<answer>` tag if there is
    one, else the whole response; normalised. A number compares as a number ("1,000" = "1000")."""
    tags = ANSWER_TAG.findall(text)
    answer, method = (tags[-1], "answer_tag") if tags else (text, "whole_response")
    number = normalize_number(answer)
    if number is not None:
        return Extraction(number, method)
    normalized = normalize_text(answer)
    return Extraction(normalized if normalized else None, method if normalized else "none")
