"""Answer extractors: every GSM8K gold answer, and a table of the ways models write answers."""

from __future__ import annotations

import json
import re

import pytest

from megasft.evaluate.extract import (
    extract_gsm8k_reference,
    extract_number_answer,
    extract_text_answer,
    normalize_number,
    normalize_text,
    numbers_in,
)
from megasft.evaluate.tasks import DEFAULT_FORMATS, reference_answer, score
from tests.conftest import shared_path


def test_every_gsm8k_test_gold_answer_parses():
    path = shared_path("data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) > 1000
    for index, row in enumerate(rows, start=1):
        tail = row["answer"].rsplit("####", 1)[1].strip()
        expected = tail.replace(",", "")
        assert extract_gsm8k_reference(row["answer"]) == expected, f"row {index}: {tail!r}"
        # A model that answers exactly like the reference is scored correct.
        assert extract_number_answer(row["answer"]).answer == expected, f"row {index}"


@pytest.mark.parametrize(
    ("response", "answer", "method"),
    [
        ("#### 18", "18", "hash"),
        ("She makes 9 * 2 = $18 a day.\n#### 18", "18", "hash"),
        ("#### $1,000.00", "1000", "hash"),
        ("#### 18 dollars\nI hope that helps, 42", "18", "hash"),
        ("first #### 3\nthen #### 5", "5", "hash"),
        ("####18", "18", "hash"),
        ("#### -7", "-7", "hash"),
        ("#### 2.50", "2.5", "hash"),
        ("#### 0.5", "0.5", "hash"),
        ("#### .5", "0.5", "hash"),
        ("#### 18.", "18", "hash"),
        ("#### 18.0", "18", "hash"),
        ("reasoning 1 2 3 <answer>18</answer>", "18", "answer_tag"),
        ("<answer> 1,234 </answer>", "1234", "answer_tag"),
        ("<answer>The total is 24 apples</answer>", "24", "answer_tag"),
        ("<ANSWER>7</ANSWER>", "7", "answer_tag"),
        ("<answer>3</answer> wait, <answer>4</answer>", "4", "answer_tag"),
        ("<answer>\n12\n</answer>", "12", "answer_tag"),
        ("#### none\n<answer>9</answer>", "9", "answer_tag"),
        ("<answer>eighteen</answer> after 3 steps", "3", "last_number"),
        ("3 + 5 = 8, so the answer is 8.", "8", "last_number"),
        ("The answer is $1,600.", "1600", "last_number"),
        ("It is 50%.", "50", "last_number"),
        ("It costs \u22124 dollars", "-4", "last_number"),
        ("from 3-5 people", "5", "last_number"),
        ("(-12)", "-12", "last_number"),
        ("The 2nd answer: 10,000,000", "10000000", "last_number"),
        ("lists 1,2,3", "3", "last_number"),
        ("version 1.5 then 2.25", "2.25", "last_number"),
        ("I do not know.", None, "none"),
        ("", None, "none"),
    ],
)
def test_number_answer_table(response, answer, method):
    extraction = extract_number_answer(response)
    assert (extraction.answer, extraction.method) == (answer, method)


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


def test_gsm8k_reference_forms():
    assert extract_gsm8k_reference("work\n#### 1,600") == "1600"
    assert extract_gsm8k_reference("work <answer>72</answer>") == "72"
    assert extract_gsm8k_reference(" 72 ") == "72"
    # A worked solution without a marked answer is not guessed from its last number.
    assert extract_gsm8k_reference("so 3 + 4 = 7") is None
    assert extract_gsm8k_reference("#### seven") is None


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("Paris", "paris"),
        ("  Paris.  ", "paris"),
        ('"Paris"', "paris"),
        ("the  Eiffel\nTower", "the eiffel tower"),
        ("<answer>Paris</answer>", "paris"),
        ("ＰＡＲＩＳ", "paris"),  # full-width letters (NFKC)
        ("1,000", "1000"),
        ("", None),
    ],
)
def test_text_answer_table(response, answer):
    assert extract_text_answer(response).answer == answer


def test_normalize_text_keeps_inner_punctuation():
    assert normalize_text("U.S.A.") == "u.s.a"
    assert normalize_text("a, b") == "a, b"


def test_task_scoring():
    gsm8k_format = re.compile(DEFAULT_FORMATS["gsm8k"])
    expected = reference_answer("gsm8k", "... #### 1,200")
    assert expected == "1200"
    right = score("gsm8k", "so <answer>1200</answer>", expected, gsm8k_format)
    assert right.correct and right.format_ok and right.method == "answer_tag"
    unformatted = score("gsm8k", "the answer is 1,200", expected, gsm8k_format)
    assert unformatted.correct and not unformatted.format_ok
    wrong = score("gsm8k", "#### 1100", expected, gsm8k_format)
    assert not wrong.correct and wrong.format_ok and wrong.answer == "1100"
    nothing = score("gsm8k", "no idea", expected, gsm8k_format)
    assert not nothing.correct and nothing.answer is None

    match_any = re.compile(DEFAULT_FORMATS["exact-match"])
    assert score(
        "exact-match", "Paris.", reference_answer("exact-match", "paris"), match_any
    ).correct
    assert not score("exact-match", " ", reference_answer("exact-match", "x"), match_any).format_ok

    json_object = re.compile(r"^\{.*\}$")
    assert score("format", "{}", None, json_object).correct
    assert not score("format", "nope", None, json_object).correct
