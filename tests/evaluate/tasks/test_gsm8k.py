"""`--task gsm8k`: every GSM8K gold answer, a table of the ways models write answers, scoring."""

from __future__ import annotations

import json
import re

import pytest

from megasft.evaluate.tasks import get_task
from tests.conftest import shared_path

GSM8K = get_task("gsm8k")


def test_every_gsm8k_test_gold_answer_parses():
    path = shared_path("data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) > 1000
    for index, row in enumerate(rows, start=1):
        tail = row["answer"].rsplit("####", 1)[1].strip()
        expected = tail.replace(",", "")
        assert GSM8K.reference_answer(row["answer"]) == expected, f"row {index}: {tail!r}"
        # A model that answers exactly like the reference is scored correct.
        assert GSM8K.extract(row["answer"]).answer == expected, f"row {index}"


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
    extraction = GSM8K.extract(response)
    assert (extraction.answer, extraction.method) == (answer, method)


def test_reference_forms():
    assert GSM8K.reference_answer("work\n#### 1,600") == "1600"
    # A worked solution's own numbers, first and last, are not the answer.
    worked = "She buys 3 packs of 5 = <<3*5=15>>15 pens, then gives 20 away.\n#### 15"
    assert GSM8K.reference_answer(worked) == "15"
    assert GSM8K.extract(worked).answer == "15"
    assert GSM8K.reference_answer("7 - 2 = 5; 5 + 9 = 14 (then 99 - 85)\n#### 14") == "14"
    assert GSM8K.reference_answer("work <answer>72</answer>") == "72"
    assert GSM8K.reference_answer(" 72 ") == "72"
    # A worked solution without a marked answer is not guessed from its last number.
    assert GSM8K.reference_answer("so 3 + 4 = 7") is None
    assert GSM8K.reference_answer("#### seven") is None


def test_scoring_with_the_default_format():
    gsm8k_format = re.compile(GSM8K.default_format_pattern)
    expected = GSM8K.reference_answer("... #### 1,200")
    assert expected == "1200"
    right = GSM8K.score("so <answer>1200</answer>", expected, gsm8k_format)
    assert right.correct and right.format_ok and right.method == "answer_tag"
    unformatted = GSM8K.score("the answer is 1,200", expected, gsm8k_format)
    assert unformatted.correct and not unformatted.format_ok
    wrong = GSM8K.score("#### 1100", expected, gsm8k_format)
    assert not wrong.correct and wrong.format_ok and wrong.answer == "1100"
    nothing = GSM8K.score("no idea", expected, gsm8k_format)
    assert not nothing.correct and nothing.answer is None
    assert GSM8K.needs_reference
