"""`--task format`: correct means the response matches the pattern; no reference."""

from __future__ import annotations

import re

from megasft.evaluate.tasks import get_task

FORMAT = get_task("format")


def test_correct_when_the_pattern_matches():
    json_object = re.compile(r"^\{.*\}$")
    right = FORMAT.score("{}", None, json_object)
    assert (right.correct, right.format_ok, right.answer, right.method) == (
        True,
        True,
        None,
        "none",
    )
    wrong = FORMAT.score("nope", None, json_object)
    assert (wrong.correct, wrong.format_ok) == (False, False)


def test_needs_a_pattern_and_no_reference():
    assert FORMAT.default_format_pattern is None
    assert not FORMAT.needs_reference
    assert FORMAT.reference_answer("anything") is None
