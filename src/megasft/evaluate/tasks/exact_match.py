"""`--task exact-match`: the answer text must equal the reference's, both normalised.

Each side is reduced to the inside of its last `<answer>` tag if it has one, else taken whole.
A number compares as a number (`extract.normalize_number`: "1,000" = "1000"); other text is
compared after NFKC, casefolding, collapsing whitespace and dropping trailing sentence
punctuation and surrounding quotes (`normalize_text`).
"""

from __future__ import annotations

import unicodedata

from megasft.evaluate.extract import ANSWER_TAG, normalize_number
from megasft.evaluate.tasks import register_task
from megasft.evaluate.tasks.base import Extraction, Task


@register_task
class ExactMatch(Task):
    name = "exact-match"
    extraction_methods = ("answer_tag", "whole_response", "none")
    # Anything but an empty (or whitespace-only) response.
    default_format_pattern = r"\S"
    reference_hint = "an exact-match reference must not be empty"

    def reference_answer(self, reference: str) -> str | None:
        return self.extract(reference).answer

    def extract(self, response: str) -> Extraction:
        tags = ANSWER_TAG.findall(response)
        answer, method = (tags[-1], "answer_tag") if tags else (response, "whole_response")
        number = normalize_number(answer)
        if number is not None:
            return Extraction(number, method)
        normalized = normalize_text(answer)
        return Extraction(normalized if normalized else None, method if normalized else "none")


def normalize_text(text: str) -> str:
    """Text as `exact-match` compares it.

    Args:
        text: an answer.

    Returns:
        `text` NFKC-normalised, casefolded, whitespace collapsed, without trailing sentence
        punctuation (`.!?;:`) or surrounding quotes.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    text = text.rstrip(".!?;: ")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text
