"""The task registry: names, lookups, what every task promises, and a task added as a module."""

from __future__ import annotations

import re

import pytest

import megasft.evaluate.tasks as tasks
from megasft.cli import build_parser
from megasft.errors import ConfigError
from megasft.evaluate import EvaluateConfig
from megasft.evaluate.metrics import GENERATION_METRICS, generation_metrics
from megasft.evaluate.prompts import EvalExample
from megasft.evaluate.tasks import (
    Extraction,
    Task,
    get_task,
    register_task,
    register_task_family,
    task_choices,
    task_names,
)

RESPONSES = [
    "#### 18",
    "<answer>Paris</answer>",
    "<answer>7</answer>",
    "3 + 5 = 8",
    "Paris.",
    "",
    "   ",
    '{"name": "f"}',
]


def test_the_tasks_are_registered_by_name():
    assert task_names() == ("exact-match", "format", "gsm8k", "tool-call")
    assert [get_task(name).name for name in task_names()] == list(task_names())


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(
        ConfigError, match="--task must be one of exact-match, format, gsm8k, tool-call"
    ):
        get_task("mmlu")


@pytest.mark.parametrize("name", task_names())
def test_every_task_keeps_its_promises(name):
    task = get_task(name)
    for response in RESPONSES:
        assert task.extract(response).method in task.extraction_methods, response
    if task.default_format_pattern is not None:
        re.compile(task.default_format_pattern)
    if task.needs_reference:
        assert task.reference_hint
    metrics = generation_metrics([True], [True], [3], [True], ["none"], task.extraction_methods)
    assert set(task.metric_names) <= set(metrics)
    example = EvalExample("f.jsonl", 1, (), "x")
    assert task.prompt(example) == example.prompt


def test_generation_metrics_are_those_the_tasks_give():
    assert GENERATION_METRICS == ("accuracy", "format_accuracy", "mean_response_tokens")


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test."""
    task_names()  # discover the task modules first, into the registry that stays
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    monkeypatch.setattr(tasks, "_FAMILIES", dict(tasks._FAMILIES))


def test_a_new_task_module_is_all_it_takes(registry, tmp_path):

    @register_task
    class Yes(Task):
        name = "yes"
        extraction_methods = ("whole_response",)
        default_format_pattern = r"\S"
        reference_hint = "a yes-task reference says yes or no"

        def reference_answer(self, reference: str) -> str | None:
            return reference.strip().lower() or None

        def extract(self, response: str) -> Extraction:
            return Extraction(response.strip().lower(), "whole_response")

    assert "yes" in task_names()
    assert get_task("yes").score("Yes", "yes", re.compile(r"\S")).correct
    config = EvaluateConfig(model="m", data="d.jsonl", output=str(tmp_path), task="yes")
    assert config.resolved_format_pattern == r"\S"
    argv = ["evaluate", "--model", "m", "--data", "d.jsonl", "--output", "o", "--task", "yes"]
    assert build_parser().parse_args(argv).task == "yes"


def test_two_tasks_cannot_share_a_name(registry):

    class Another(Task):
        name = "gsm8k"
        extraction_methods = ("none",)

        def reference_answer(self, reference):
            return None

        def extract(self, response):
            return Extraction(None, "none")

    with pytest.raises(ValueError, match="two evaluation tasks named 'gsm8k'"):
        register_task(Another)


def test_a_family_of_tasks_is_one_factory(registry, tmp_path):

    class Echo(Task):
        extraction_methods = ("whole_response",)
        default_format_pattern = r"\S"
        reference_hint = "any text"

        def __init__(self, word: str):
            self.name = f"echo:{word}"
            self.word = word

        def reference_answer(self, reference: str) -> str | None:
            return reference

        def extract(self, response: str) -> Extraction:
            return Extraction(response, "whole_response")

    @register_task_family("echo")
    def echo(word: str) -> Task:
        return Echo(word)

    assert get_task("echo:hi").word == "hi"
    assert "echo:TASK" in task_choices()
    config = EvaluateConfig(model="m", data="d.jsonl", output=str(tmp_path), task="echo:hi")
    assert config.task == "echo:hi"
    with pytest.raises(ValueError, match="two evaluation task families named 'echo'"):
        register_task_family("echo")(lambda word: Echo(word))
