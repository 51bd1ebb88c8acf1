"""report.html: self-contained, escaped, with the loss curve drawn from a training log."""

from __future__ import annotations

import re

import pytest

from megasft.errors import InputError
from megasft.evaluate.paired import paired_statistics
from megasft.evaluate.report import loss_chart, read_training_log, write_report
from tests.evaluate.conftest import write_jsonl


def _sample(index, model, correct, prediction="p"):
    return {
        "index": index,
        "model": model,
        "source": "data.jsonl",
        "row": index + 1,
        "prompt": "<|im_start|>user\nQ<|im_end|>",
        "reference": "#### 1",
        "reference_answer": "1",
        "prediction": prediction,
        "extracted_answer": "1" if correct else "2",
        "extraction_method": "hash",
        "correct": correct,
        "format_ok": True,
        "response_tokens": 3,
        "stopped": True,
    }


def _metrics(gate=None, base=True):
    generation = {
        "samples": 2,
        "correct": 1,
        "truncated": 0,
        "answer_extraction": {"hash": 2},
        "generated_tokens_per_second": 10.0,
    }
    return {
        "task": "gsm8k",
        "model": {"path": "tuned<dir>", "kind": "hf"},
        "baseline": {"path": "base", "kind": "hf"} if base else None,
        "data": {"prompts": "data.jsonl", "examples": 2, "val_data": None},
        "settings": {"max_new_tokens": 8, "format_pattern": "####"},
        "created": "2025-01-01T00:00:00+00:00",
        "tuned": {"accuracy": 0.5, "format_accuracy": 1.0, "val_loss": 1.0, **generation},
        "base": {"accuracy": 0.25, "format_accuracy": 0.5, "val_loss": 2.0, **generation}
        if base
        else None,
        "deltas": {"delta_accuracy": 0.25, "delta_format_accuracy": 0.5, "delta_val_loss": -1.0}
        if base
        else None,
        "gate": gate,
        "warnings": ["tokenizers <differ>"],
    }


def test_report_shows_verdict_metrics_samples_and_escapes_text(tmp_path):
    gate = {
        "passed": False,
        "reason": "failed: accuracy = 0.5, not >= 0.9",
        "conditions": [
            {"condition": "accuracy>=0.9", "value": 0.5, "passed": False},
        ],
    }
    samples = [
        _sample(0, "tuned", True, "<b>bold</b> & #### 1"),
        _sample(1, "tuned", False),
        _sample(0, "base", False),
        _sample(1, "base", True),
    ]
    path = tmp_path / "report.html"
    write_report(
        path, _metrics(gate), samples, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    )
    page = path.read_text()
    assert "Gate FAILED" in page and "accuracy&gt;=0.9" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; #### 1" in page and "<b>bold</b>" not in page
    assert "tuned&lt;dir&gt;" in page and "tokenizers &lt;differ&gt;" in page
    assert "Broken by tuning (base right, tuned wrong) (1)" in page
    assert "Fixed by tuning (base wrong, tuned right) (1)" in page
    assert "Right answers (1)" in page and "Wrong answers (1)" in page
    assert "<polyline" in page
    # tuned vs base vs delta, with lower-is-better deltas coloured as improvements
    assert re.search(
        r"<td>val_loss</td><td class='num'>1.0000</td><td class='num'>2.0000</td>"
        r"<td class='num up'>-1.0000</td>",
        page,
    )
    assert "<script" not in page and "<link" not in page and "src=" not in page


def test_report_shows_the_paired_comparison(tmp_path):
    metrics = _metrics()
    metrics["paired"] = paired_statistics([True, True, True, False], [False, False, True, False])
    samples = [_sample(0, "tuned", True), _sample(0, "base", False)]
    path = tmp_path / "report.html"
    write_report(path, metrics, samples, None)
    page = path.read_text()
    low = metrics["paired"]["delta_accuracy_ci_low"]
    high = metrics["paired"]["delta_accuracy_ci_high"]
    assert f"delta_accuracy 95% interval <b>[{low:+.4f}, {high:+.4f}]</b>" in page
    assert "McNemar exact p = 0.5 on 4 prompts: the difference is within noise" in page
    assert "<td>only tuned right</td><td class='num'>2</td>" in page


def test_report_without_gate_baseline_or_log(tmp_path):
    path = tmp_path / "report.html"
    write_report(path, _metrics(base=False), [_sample(0, "tuned", True)], None)
    page = path.read_text()
    assert "No gate was given" in page and "<svg" not in page and "<th>base</th>" not in page
    assert "Paired comparison" not in page


def test_loss_chart_draws_train_and_val_curves_and_thins_long_logs():
    rows = [{"step": s, "loss": 5.0 - s / 1000} for s in range(3000)]
    rows[-1]["val_loss"] = 2.5
    rows[1500]["val_loss"] = 3.0
    svg = loss_chart(rows)
    polylines = re.findall(r"points='([^']*)'", svg)
    assert len(polylines) == 2
    assert 900 <= len(polylines[0].split()) <= 1001 and len(polylines[1].split()) == 2
    assert ">loss<" in svg and ">val_loss<" in svg
    assert loss_chart([{"step": 1, "loss": float("nan")}]).startswith("<p")
    # one point: no division by zero
    assert "<polyline" in loss_chart([{"step": 5, "loss": 1.0}])


def test_training_log_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_training_log(tmp_path / "absent.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(InputError, match="line 2: not valid JSON"):
        read_training_log(bad)
    bad.write_text('{"step": "one", "loss": 1}\n')
    with pytest.raises(InputError, match="line 1: 'step' must be a number"):
        read_training_log(bad)
    bad.write_text("\n\n")
    with pytest.raises(InputError, match="has no rows"):
        read_training_log(bad)
    good = write_jsonl(tmp_path / "good.jsonl", [{"step": 1, "loss": 2.5, "lr": 0.1}])
    assert read_training_log(good) == [{"step": 1, "loss": 2.5, "lr": 0.1}]
