"""A small synthetic SFT task whose answers can be checked: arithmetic word problems.

Written in GSM8K's shape (`question`, and an `answer` that reasons and ends in `#### N`), so
the demo runs exactly the path a GSM8K fine-tune takes, with `--map prompt=question,response=answer`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles")
# Operands stay small enough that a 4-layer model on CPU learns the arithmetic facts in a few
# minutes of training (the demo shows the pipeline working, not a model's reasoning).
MIN_NUMBER, MAX_NUMBER = 2, 15


def make_problem(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    first, second = rng.randint(MIN_NUMBER, MAX_NUMBER), rng.randint(MIN_NUMBER, MAX_NUMBER)
    kind = rng.choice(("buy", "lose", "double"))
    if kind == "buy":
        question = f"{name} has {first} {item} and gets {second} more. How many {item} does {name} have now?"
        total = first + second
        reasoning = f"{name} has {first} + {second} = {total} {item}."
    elif kind == "lose":
        first += second  # never below zero
        question = f"{name} has {first} {item} and gives away {second}. How many {item} are left?"
        total = first - second
        reasoning = f"{name} has {first} - {second} = {total} {item} left."
    else:
        question = (
            f"{name} has {first} {item} and then doubles them. How many {item} does {name} have?"
        )
        total = 2 * first
        reasoning = f"{name} has 2 x {first} = {total} {item}."
    return {"question": question, "answer": f"{reasoning}\n#### {total}"}


def write_problems(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(count):
            file.write(json.dumps(make_problem(rng)) + "\n")
    return path
