"""Metrics of one model, tuned-minus-base deltas, and the registration gate.

Gate grammar: comma-separated conditions `METRIC OP NUMBER`, OP one of >=, >, <=, <, ==, e.g.
`accuracy>=0.5,delta_accuracy_ci_low>0`. METRIC is one of GATE_METRICS (the tuned model's
value), `delta_<metric>` (tuned minus base), a paired statistic (PAIRED_METRICS), or a task's
own `NAME,FILTER` metric as lm-evaluation-harness names them (`exact_match,strict-match`; its
commas do not split conditions). The gate passes when every condition holds; its verdict lists
each condition with the value it was checked against.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megasft.errors import ConfigError
from megasft.evaluate.paired import PAIRED_METRICS
from megasft.evaluate.tasks import Task, metric_names

GENERATION_METRICS = metric_names()
"""Metrics that need generation (a data file of prompts): those the tasks give."""
LOSS_METRICS = ("val_loss", "perplexity")
"""Metrics that need a prepared dataset (`--val-data`, or a prepare output as `--data`)."""
GATE_METRICS = GENERATION_METRICS + LOSS_METRICS
DELTA_PREFIX = "delta_"
OPERATORS = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}
_OPERATOR_CHARACTERS = re.compile(r"[<>=!]")
_CONDITION = re.compile(
    r"\s*(?P<metric>[A-Za-z_][A-Za-z0-9_,\-]*)\s*(?P<op>>=|<=|==|>|<|=|!=|=>|=<)\s*"
    r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
)


@dataclass(frozen=True)
class GateCondition:
    metric: str
    """A GATE_METRICS name, `delta_` + one, a PAIRED_METRICS name, or a task's own metric."""
    op: str
    """One of OPERATORS."""
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    @property
    def base_metric(self) -> str:
        return self.metric.removeprefix(DELTA_PREFIX)

    @property
    def is_delta(self) -> bool:
        return self.metric.startswith(DELTA_PREFIX)

    @property
    def is_paired(self) -> bool:
        return self.metric in PAIRED_METRICS


def is_task_metric_name(name: str) -> bool:
    """Whether `name` has the form of a task's own metric, `NAME,FILTER` (lm-evaluation-harness's
    names, e.g. `exact_match,strict-match`): which ones exist is known only to the task."""
    return "," in name


def known_gate_metrics() -> list[str]:
    """The metric names a gate condition may use, besides a task's own `NAME,FILTER` metrics:
    GATE_METRICS, then each as `delta_`, then the paired statistics."""
    return [*GATE_METRICS, *(DELTA_PREFIX + metric for metric in GATE_METRICS), *PAIRED_METRICS]


def _conditions_text(text: str) -> list[str]:
    """`text` split at the commas between conditions, not those inside a `NAME,FILTER` metric:
    a piece without an operator is the start of the next piece's metric name."""
    parts: list[str] = []
    pending = ""
    for part in text.split(","):
        if part.strip() and not _OPERATOR_CHARACTERS.search(part):
            pending += part + ","
            continue
        parts.append(pending + part)
        pending = ""
    if pending:
        parts.append(pending.rstrip(","))
    return parts


def parse_gate(text: str) -> tuple[GateCondition, ...]:
    """Parses `--gate` text.

    Args:
        text: comma-separated conditions `METRIC OP NUMBER`.

    Returns:
        The conditions, in the order given.

    Raises:
        ConfigError: naming the bad condition and what is allowed.
    """
    conditions = []
    for part in _conditions_text(text):
        if not part.strip():
            raise ConfigError(
                f"--gate {text!r} has an empty condition; separate conditions with single commas"
            )
        match = _CONDITION.fullmatch(part)
        if match is None:
            raise ConfigError(
                f"--gate: {part.strip()!r} is not METRIC OP NUMBER (OP one of "
                f"{', '.join(OPERATORS)}), e.g. accuracy>=0.5,delta_accuracy>0"
            )
        metric, op = match["metric"], match["op"]
        if op not in OPERATORS:
            hint = {"=": "==", "=>": ">=", "=<": "<="}.get(op)
            raise ConfigError(
                f"--gate: {part.strip()!r} uses {op!r}; the operators are {', '.join(OPERATORS)}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
        if metric not in known_gate_metrics() and not is_task_metric_name(metric):
            raise ConfigError(
                f"--gate: unknown metric {metric!r}; the known metrics are "
                f"{', '.join(known_gate_metrics())}, and an lm-eval task's own as NAME,FILTER "
                "(e.g. exact_match,strict-match)"
            )
        conditions.append(GateCondition(metric, op, float(match["number"])))
    return tuple(conditions)


def check_gate_is_computable(
    conditions: Sequence[GateCondition],
    has_baseline: bool,
    has_generation: bool,
    has_val: bool,
    task: Task | None = None,
) -> None:
    """Refuses, before any model is loaded, a gate on a metric this run will not compute.

    Args:
        conditions: the parsed gate.
        has_baseline, has_generation, has_val: whether the run has a base model, a data file
            of prompts, and a prepared dataset for the validation loss.
        task: the run's task, whose scores must include the generation metrics named (None:
            any task's).

    Raises:
        ConfigError: naming the condition and the setting it needs.
    """
    for condition in conditions:
        if (condition.is_delta or condition.is_paired) and not has_baseline:
            raise ConfigError(
                f"--gate {condition}: {condition.metric} compares with the base model; pass "
                "--baseline DIR"
            )
        if condition.base_metric in LOSS_METRICS:
            if not has_val:
                raise ConfigError(
                    f"--gate {condition}: {condition.base_metric} needs a prepared dataset; "
                    "pass --val-data DIR (a `megasft prepare` output)"
                )
            continue
        # Everything else (task metrics, paired statistics) comes from generation.
        name = "accuracy" if condition.is_paired else condition.base_metric
        if not has_generation:
            raise ConfigError(
                f"--gate {condition}: {name} comes from generation, but --data "
                "is a prepared dataset; pass a data file of prompts as --data (and the dataset "
                "as --val-data)"
            )
        if task is not None and not task.gives_metric(name):
            raise ConfigError(
                f"--gate {condition}: --task {task.name} gives no {name}; its metrics are "
                f"{', '.join(task.metric_names)}"
            )


def generation_metrics(
    correct: Sequence[bool],
    format_ok: Sequence[bool],
    response_tokens: Sequence[int],
    stopped: Sequence[bool],
    methods: Sequence[str],
    method_order: Sequence[str],
) -> dict:
    """accuracy, format_accuracy, mean_response_tokens and the counts that explain them.

    Args:
        correct, format_ok, response_tokens, stopped, methods: per sample, whether its
            answer is correct, whether it is well-formed, its length in tokens, whether it
            ended before `--max-new-tokens`, and how its answer was found.
        method_order: the task's extraction methods, in the order `answer_extraction` lists
            them (a method not among them is counted after them).

    Returns:
        The metrics of one model, as metrics.json holds them under `tuned` or `base`.

    Raises:
        ValueError: when there are no samples.
    """
    count = len(correct)
    if count == 0:
        raise ValueError("no samples to compute metrics on")
    by_method = Counter(methods)
    order = [*method_order, *(method for method in by_method if method not in method_order)]
    return {
        "accuracy": sum(correct) / count,
        "format_accuracy": sum(format_ok) / count,
        "mean_response_tokens": sum(response_tokens) / count,
        "samples": count,
        "correct": sum(correct),
        "truncated": count - sum(stopped),
        "answer_extraction": {method: by_method[method] for method in order if by_method[method]},
    }


def deltas(tuned: Mapping, base: Mapping) -> dict:
    """Tuned minus base.

    Args:
        tuned, base: the two models' metrics.

    Returns:
        `delta_<metric>` for each gate metric, and each task's own `NAME,FILTER` metric, that
        both have as a number.
    """
    names = [*GATE_METRICS, *(name for name in tuned if is_task_metric_name(name))]
    return {
        DELTA_PREFIX + metric: tuned[metric] - base[metric]
        for metric in names
        if _is_number(tuned.get(metric)) and _is_number(base.get(metric))
    }


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def evaluate_gate(conditions: Sequence[GateCondition], values: Mapping[str, float]) -> dict:
    """Checks the gate.

    Args:
        conditions: the parsed gate.
        values: the flat metrics (`summary` in metrics.json); a missing or NaN value fails.

    Returns:
        The verdict: `passed`, a one-line `reason`, and each condition with its value.
    """
    results = []
    for condition in conditions:
        value = values.get(condition.metric)
        holds = (
            value is not None
            and not math.isnan(value)
            and OPERATORS[condition.op](value, condition.threshold)
        )
        results.append(
            {
                "condition": str(condition),
                "metric": condition.metric,
                "op": condition.op,
                "threshold": condition.threshold,
                "value": value,
                "passed": holds,
            }
        )
    failed = [result for result in results if not result["passed"]]
    held = [result for result in results if result["passed"]]
    if failed:
        reason = "failed: " + "; ".join(_describe(result) for result in failed)
        if held:
            reason += " (held: " + "; ".join(_describe(result) for result in held) + ")"
    else:
        reason = "passed: " + "; ".join(_describe(result) for result in held)
    return {"passed": not failed, "reason": reason, "conditions": results}


def _describe(result: dict) -> str:
    value = result["value"]
    shown = "not computed" if value is None else f"{value:.6g}"
    verb = "" if result["passed"] else "not "
    return f"{result['metric']} = {shown}, {verb}{result['op']} {result['threshold']:g}"
