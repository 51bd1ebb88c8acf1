"""Numbers and answer tags as models write them: what the tasks' answer extractors share.

Numbers are normalised so that equal values compare equal as strings: a leading `$`, thousands
separators and spaces go, a trailing `.0`/`.50` loses its zeros (`18.50` -> `18.5`,
`1,000.00` -> `1000`), a trailing `%` or `.` is dropped, the Unicode minus is a minus, `-0` is `0`.
"""

from __future__ import annotations

import re
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
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
"""`<answer>...</answer>`, the final-answer format the seed recipes train for."""
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})


def normalize_number(text: str) -> str | None:
    """The canonical string of the number `text` spells.

    Args:
        text: e.g. "1,000" -> "1000", "$18.00" -> "18", "18.50" -> "18.5", "-0" -> "0",
            "50%" -> "50".

    Returns:
        The canonical string, or None when `text` is not one number.
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
    """Every number in `text`, in order, normalised (`normalize_number`).

    Args:
        text: any text.

    Returns:
        The numbers' canonical strings.
    """
    text = text.translate(_MINUS_SIGNS)
    numbers = (normalize_number(match.group()) for match in NUMBER_PATTERN.finditer(text))
    return [number for number in numbers if number is not None]
