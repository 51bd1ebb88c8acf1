"""Numbers as models write them, normalised so that equal values compare equal as strings."""

from __future__ import annotations

import pytest

from megasft.evaluate.extract import normalize_number, numbers_in


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("1,000", "1000"),
        ("$18.00", "18"),
        ("18.50", "18.5"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("50%", "50"),
        (" 7. ", "7"),
        ("007", "7"),
        ("1e5", None),
        ("12 apples", None),
        ("", None),
        ("-", None),
    ],
)
def test_normalize_number(text, number):
    assert normalize_number(text) == number


def test_numbers_in_does_not_misread_separators():
    assert numbers_in("1,0000 and 12,34") == ["0", "12", "34"]
    # Digits glued to letters still count ("x2", "3rd"): models write "=18", "is:18", "18th".
    assert numbers_in("x2 and 3rd and is:18") == ["2", "3", "18"]
