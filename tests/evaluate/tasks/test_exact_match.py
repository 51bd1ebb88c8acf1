"""`--task exact-match`: answers normalised as text (or as numbers) and compared."""

from __future__ import annotations

import re

import pytest

from megasft.evaluate.tasks import get_task
from megasft.evaluate.tasks.exact_match import normalize_text

EXACT_MATCH = get_task("exact-match")


@pytest.mark.parametrize(
    ("response", "answer", "method"),
    [
        ("Paris", "paris", "whole_response"),
        ("  Paris.  ", "paris", "whole_response"),
        ('"Paris"', "paris", "whole_response"),
        ("the  Eiffel\nTower", "the eiffel tower", "whole_response"),
        ("<answer>Paris</answer>", "paris", "answer_tag"),
        ("ＰＡＲＩＳ", "paris", "whole_response"),  # full-width letters (NFKC)
        ("1,000", "1000", "whole_response"),
        ("", None, "none"),
        ("<answer> </answer>", None, "none"),
    ],
)
def test_text_answer_table(response, answer, method):
    extraction = EXACT_MATCH.extract(response)
    assert (extraction.answer, extraction.method) == (answer, method)


def test_normalize_text_keeps_inner_punctuation():
    assert normalize_text("U.S.A.") == "u.s.a"
    assert normalize_text("a, b") == "a, b"


def test_scoring_with_the_default_format():
    match_any = re.compile(EXACT_MATCH.default_format_pattern)
    assert EXACT_MATCH.score("Paris.", EXACT_MATCH.reference_answer("paris"), match_any).correct
    assert EXACT_MATCH.score("1000", EXACT_MATCH.reference_answer("1,000"), match_any).correct
    blank = EXACT_MATCH.score(" ", EXACT_MATCH.reference_answer("x"), match_any)
    assert not blank.format_ok and not blank.correct
    assert EXACT_MATCH.reference_answer("  ") is None
    assert EXACT_MATCH.needs_reference
