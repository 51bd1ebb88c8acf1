"""`--task format`: a response is correct when it matches `--format-pattern`.

No reference is needed, and no answer is extracted; accuracy and format accuracy are the same
number. There is no default pattern: the pattern is what is being measured.
"""

from __future__ import annotations

import re

from megasft.evaluate.tasks import register_task
from megasft.evaluate.tasks.base import Extraction, Score, Task


@register_task
class Format(Task):
    name = "format"
    extraction_methods = ("none",)
    needs_reference = False

    def reference_answer(self, reference: str) -> str | None:
        return None

    def extract(self, response: str) -> Extraction:
        return Extraction(None, "none")

    def score(self, response: str, expected: str | None, format_pattern: re.Pattern) -> Score:
        format_ok = format_pattern.search(response) is not None
        return Score(None, "none", format_ok, format_ok)
