"""`--task gsm8k`: grade-school maths; the answer is a number, compared after normalisation.

A response's answer, tried in this order: the first number after the last `####` (the GSM8K
reference format); the last number inside the last `<answer>...</answer>` (the format the seed
recipes train for); the last number anywhere. Numbers are normalised by `extract.normalize_number`.
"""

from __future__ import annotations

import re

from megasft.evaluate.extract import ANSWER_TAG, normalize_number, numbers_in
from megasft.evaluate.tasks import register_task
from megasft.evaluate.tasks.base import Extraction, Task

HASH_ANSWER = re.compile(r"####(.*)")


@register_task
class Gsm8k(Task):
    name = "gsm8k"
    extraction_methods = ("hash", "answer_tag", "last_number", "none")
    # An explicit final answer in one of the two formats the extractor prefers.
    default_format_pattern = r"####\s*-?\$?\d|<answer>\s*-?\$?[\d.,]+\s*</answer>"
    reference_hint = "a gsm8k reference needs its answer after '####' (or in <answer>...</answer>)"

    def reference_answer(self, reference: str) -> str | None:
        """The number after `####`; also a reference in the seed format (`<answer>N</answer>`)
        or one that is just a number. Anything else gives None, because a reference answer
        guessed from the last number of a worked solution could be wrong."""
        hash_answers = HASH_ANSWER.findall(reference)
        if hash_answers:
            return normalize_number(hash_answers[-1])
        tags = ANSWER_TAG.findall(reference)
        if tags:
            return normalize_number(tags[-1])
        return normalize_number(reference)

    def extract(self, response: str) -> Extraction:
        """`#### N`, else `<answer>N</answer>`, else the last number."""
        hash_answers = HASH_ANSWER.findall(response)
        if hash_answers:
            numbers = numbers_in(hash_answers[-1])
            if numbers:
                return Extraction(numbers[0], "hash")
        tags = ANSWER_TAG.findall(response)
        if tags:
            numbers = numbers_in(tags[-1])
            if numbers:
                return Extraction(numbers[-1], "answer_tag")
        numbers = numbers_in(response)
        if numbers:
            return Extraction(numbers[-1], "last_number")
        return Extraction(None, "none")
