"""Metrics on crafted predictions, deltas, and the gate: grammar, errors and verdicts."""

from __future__ import annotations

import math

import pytest

from megasft.errors import ConfigError
from megasft.evaluate.metrics import (
    GateCondition,
    check_gate_is_computable,
    deltas,
    evaluate_gate,
    generation_metrics,
    known_gate_metrics,
    parse_gate,
)
from megasft.evaluate.tasks import get_task


def test_generation_metrics_on_crafted_samples():
    metrics = generation_metrics(
        correct=[True, False, True, False],
        format_ok=[True, True, False, False],
        response_tokens=[10, 20, 30, 41],
        stopped=[True, True, True, False],
        methods=["none", "last_number", "answer_tag", "hash"],
        method_order=("hash", "answer_tag", "last_number", "none"),
    )
    assert metrics["accuracy"] == 0.5
    assert metrics["format_accuracy"] == 0.5
    assert metrics["mean_response_tokens"] == 25.25
    assert metrics["samples"] == 4 and metrics["correct"] == 2 and metrics["truncated"] == 1
    assert metrics["answer_extraction"] == {
        "hash": 1,
        "answer_tag": 1,
        "last_number": 1,
        "none": 1,
    }
    assert list(metrics["answer_extraction"]) == ["hash", "answer_tag", "last_number", "none"]


def test_answer_extraction_counts_methods_the_task_did_not_list_last():
    metrics = generation_metrics(
        correct=[True, True, False],
        format_ok=[True, True, True],
        response_tokens=[1, 1, 1],
        stopped=[True, True, True],
        methods=["new", "hash", "new"],
        method_order=("hash", "none"),
    )
    assert list(metrics["answer_extraction"].items()) == [("hash", 1), ("new", 2)]


def test_deltas_are_tuned_minus_base_for_metrics_both_have():
    tuned = {"accuracy": 0.75, "format_accuracy": 1.0, "val_loss": 1.5, "samples": 4}
    base = {"accuracy": 0.25, "format_accuracy": 0.5, "val_loss": 2.0, "perplexity": 7.4}
    assert deltas(tuned, base) == {
        "delta_accuracy": 0.5,
        "delta_format_accuracy": 0.5,
        "delta_val_loss": -0.5,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("accuracy>=0.5", [("accuracy", ">=", 0.5)]),
        (
            " accuracy >= 0.5 , delta_accuracy > 0 ",
            [("accuracy", ">=", 0.5), ("delta_accuracy", ">", 0.0)],
        ),
        ("val_loss<2.5,perplexity<=12", [("val_loss", "<", 2.5), ("perplexity", "<=", 12.0)]),
        ("delta_val_loss<-0.01", [("delta_val_loss", "<", -0.01)]),
        ("mean_response_tokens<1e3", [("mean_response_tokens", "<", 1000.0)]),
        ("format_accuracy==1", [("format_accuracy", "==", 1.0)]),
        ("accuracy>.5", [("accuracy", ">", 0.5)]),
        (
            "delta_accuracy_ci_low>0,mcnemar_p<0.05",
            [("delta_accuracy_ci_low", ">", 0.0), ("mcnemar_p", "<", 0.05)],
        ),
        # A task's own NAME,FILTER metric keeps its comma; the next one starts a condition.
        (
            "exact_match,strict-match>=0.5,delta_exact_match,strict-match>0",
            [("exact_match,strict-match", ">=", 0.5), ("delta_exact_match,strict-match", ">", 0)],
        ),
        (
            "accuracy>=0.5, acc_norm,none > 0.25",
            [("accuracy", ">=", 0.5), ("acc_norm,none", ">", 0.25)],
        ),
    ],
)
def test_gate_grammar(text, expected):
    assert [(c.metric, c.op, c.threshold) for c in parse_gate(text)] == expected


def test_unknown_metric_is_named_with_the_known_ones():
    with pytest.raises(ConfigError) as error:
        parse_gate("accuracy>=0.5,acuracy>0")
    message = str(error.value)
    assert "'acuracy'" in message
    for metric in known_gate_metrics():
        assert metric in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("accuracy=0.5", "did you mean '=='"),
        ("accuracy=>0.5", "did you mean '>='"),
        ("accuracy!=0.5", "the operators are"),
        ("accuracy>=", "is not METRIC OP NUMBER"),
        ("accuracy>=high", "is not METRIC OP NUMBER"),
        (">=0.5", "is not METRIC OP NUMBER"),
        ("accuracy>=0.5,,delta_accuracy>0", "empty condition"),
        ("accuracy>=0.5,", "empty condition"),
        ("delta_speed>0", "unknown metric 'delta_speed'"),
        ("accuracy>=0.5,exact_match", "'exact_match' is not METRIC OP NUMBER"),
        ("exact_match,,strict-match>0", "'exact_match,' is not METRIC OP NUMBER"),
    ],
)
def test_gate_syntax_errors(text, fragment):
    with pytest.raises(ConfigError, match="--gate") as error:
        parse_gate(text)
    assert fragment in str(error.value)


def test_gate_needs_what_it_reads():
    delta = parse_gate("delta_accuracy>0")
    with pytest.raises(ConfigError, match="--baseline"):
        check_gate_is_computable(delta, has_baseline=False, has_generation=True, has_val=False)
    check_gate_is_computable(delta, has_baseline=True, has_generation=True, has_val=False)
    with pytest.raises(ConfigError, match="--val-data"):
        check_gate_is_computable(
            parse_gate("val_loss<2"), has_baseline=False, has_generation=True, has_val=False
        )
    with pytest.raises(ConfigError, match="comes from generation"):
        check_gate_is_computable(
            parse_gate("accuracy>0.1"), has_baseline=False, has_generation=False, has_val=True
        )


def test_paired_statistics_need_a_baseline_and_generation():
    paired = parse_gate("delta_accuracy_ci_low>0,mcnemar_p<0.05")
    with pytest.raises(ConfigError, match="delta_accuracy_ci_low compares with the base"):
        check_gate_is_computable(paired, has_baseline=False, has_generation=True, has_val=False)
    with pytest.raises(ConfigError, match="accuracy comes from generation"):
        check_gate_is_computable(paired, has_baseline=True, has_generation=False, has_val=True)
    check_gate_is_computable(paired, has_baseline=True, has_generation=True, has_val=False)
    assert {"delta_accuracy_ci_low", "delta_accuracy_ci_high", "mcnemar_p"} <= set(
        known_gate_metrics()
    )


def test_a_task_metric_must_be_one_the_task_gives():
    harness_metric = parse_gate("exact_match,strict-match>=0.5")
    with pytest.raises(ConfigError, match="--task gsm8k gives no exact_match,strict-match"):
        check_gate_is_computable(harness_metric, True, True, False, task=get_task("gsm8k"))
    # An lm-eval task says which of its NAME,FILTER metrics exist once it is loaded.
    check_gate_is_computable(harness_metric, True, True, False, task=get_task("lm-eval:gsm8k"))
    with pytest.raises(ConfigError, match="--task lm-eval:gsm8k gives no format_accuracy"):
        check_gate_is_computable(
            parse_gate("format_accuracy>0"), True, True, False, task=get_task("lm-eval:gsm8k")
        )


def test_deltas_cover_a_tasks_own_metrics():
    tuned = {"accuracy": 0.5, "exact_match,strict-match": 0.5, "stderr": {"x,y": 0.1}}
    base = {"accuracy": 0.25, "exact_match,strict-match": 0.125}
    assert deltas(tuned, base) == {
        "delta_accuracy": 0.25,
        "delta_exact_match,strict-match": 0.375,
    }


def test_gate_verdicts_and_reasons():
    conditions = parse_gate("accuracy>=0.5,delta_accuracy>0")
    passed = evaluate_gate(conditions, {"accuracy": 0.75, "delta_accuracy": 0.25})
    assert passed["passed"] is True
    assert passed["reason"] == "passed: accuracy = 0.75, >= 0.5; delta_accuracy = 0.25, > 0"

    failed = evaluate_gate(conditions, {"accuracy": 0.75, "delta_accuracy": -0.125})
    assert failed["passed"] is False
    assert failed["reason"] == (
        "failed: delta_accuracy = -0.125, not > 0 (held: accuracy = 0.75, >= 0.5)"
    )
    assert [c["passed"] for c in failed["conditions"]] == [True, False]
    assert failed["conditions"][1] == {
        "condition": "delta_accuracy>0",
        "metric": "delta_accuracy",
        "op": ">",
        "threshold": 0.0,
        "value": -0.125,
        "passed": False,
    }


def test_gate_boundaries_and_missing_values():
    assert evaluate_gate(parse_gate("accuracy>=0.5"), {"accuracy": 0.5})["passed"]
    assert not evaluate_gate(parse_gate("accuracy>0.5"), {"accuracy": 0.5})["passed"]
    assert evaluate_gate(parse_gate("val_loss<=2"), {"val_loss": 2.0})["passed"]
    assert not evaluate_gate(parse_gate("perplexity<10"), {"perplexity": math.nan})["passed"]
    missing = evaluate_gate(parse_gate("accuracy>0"), {})
    assert not missing["passed"] and "not computed" in missing["reason"]


def test_condition_text():
    assert str(GateCondition("delta_val_loss", "<", -0.01)) == "delta_val_loss<-0.01"
