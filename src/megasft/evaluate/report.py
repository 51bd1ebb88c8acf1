"""`report.html`: the evaluation on one self-contained page.

The gate verdict and its reasons, the metrics of the tuned and the base model side by side
with their deltas and the paired statistics of their verdicts, what explains them (truncated answers, how answers were extracted), a few
right and wrong answers (and, with a baseline, the questions the tuning broke or fixed), and
the training loss curve when a training log is given. Inline CSS and an inline SVG chart: no
scripts, nothing fetched, so it opens anywhere, including as an archived pipeline artifact.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

from megasft.errors import InputError
from megasft.evaluate.metrics import GATE_METRICS, is_task_metric_name

SAMPLES_PER_SECTION = 5
CHART_POINTS = 1000
"""Most points drawn per curve; longer logs are thinned evenly (the last point is kept)."""

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: .3em .8em; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: .8em 1em; border-radius: 6px; font-weight: 600; }
.pass { background: #e3f6e5; color: #17612a; } .fail { background: #fde7e7; color: #8f1d1d; }
.none { background: #f1f1f1; color: #444; }
.up { color: #17612a; } .down { color: #8f1d1d; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; margin: .8em 0; }
.sample pre { white-space: pre-wrap; word-break: break-word; background: #fafafa; padding: .5em;
  margin: .3em 0; max-height: 20em; overflow: auto; }
.meta { color: #666; font-size: .9em; } .ok { color: #17612a; } .bad { color: #8f1d1d; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
"""
# Metrics where lower is better: a negative delta is the good direction.
_LOWER_IS_BETTER = {"val_loss", "perplexity"}


def read_training_log(path: str | Path) -> list[dict]:
    """The rows of a training log: JSON Lines with at least `step` and `loss` per line (the
    trainer's `metrics.jsonl`); other keys are kept (a `val_loss` is drawn too)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training log {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {number}: expected a JSON object per line")
        for key in ("step", "loss"):
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InputError(
                    f"{path}, line {number}: {key!r} must be a number; a training log has "
                    "`step` and `loss` on every line"
                )
        rows.append(row)
    if not rows:
        raise InputError(f"training log {path} has no rows")
    return rows


def write_report(
    path: Path, metrics: dict, samples: Sequence[dict], training_log: Sequence[dict] | None
) -> None:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>megasft evaluate: {_e(metrics['model']['path'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Evaluation of {_e(metrics['model']['path'])}</h1>",
        _verdict(metrics.get("gate")),
        _run_table(metrics),
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
        _paired_table(metrics.get("paired")),
        _explanations(metrics),
    ]
    if training_log:
        parts += ["<h2>Training loss</h2>", loss_chart(training_log)]
    parts.append(_sample_sections(samples, has_base=metrics.get("base") is not None))
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")


def _e(value) -> str:
    return html.escape(str(value))


def _number(value) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def _verdict(gate: dict | None) -> str:
    if gate is None:
        return "<p class='verdict none'>No gate was given (--gate): nothing passed or failed.</p>"
    css = "pass" if gate["passed"] else "fail"
    rows = "".join(
        f"<tr><td>{_e(result['condition'])}</td><td class='num'>{_number(result['value'])}</td>"
        f"<td class='{'ok' if result['passed'] else 'bad'}'>"
        f"{'holds' if result['passed'] else 'fails'}</td></tr>"
        for result in gate["conditions"]
    )
    return (
        f"<p class='verdict {css}'>Gate {'PASSED' if gate['passed'] else 'FAILED'}: "
        f"{_e(gate['reason'].split(': ', 1)[-1])}</p>"
        f"<table><tr><th>condition</th><th>value</th><th></th></tr>{rows}</table>"
    )


def _run_table(metrics: dict) -> str:
    rows = [
        ("task", metrics["task"]),
        ("model", f"{metrics['model']['path']} ({metrics['model']['kind']})"),
    ]
    if metrics.get("baseline"):
        rows.append(("baseline", f"{metrics['baseline']['path']} ({metrics['baseline']['kind']})"))
    rows += [
        ("prompts", metrics["data"].get("prompts") or "&ndash;"),
        ("validation data", metrics["data"].get("val_data") or "&ndash;"),
        ("examples", metrics["data"].get("examples") or "&ndash;"),
        ("max new tokens", metrics["settings"]["max_new_tokens"]),
        ("format pattern", metrics["settings"]["format_pattern"]),
        ("created", metrics["created"]),
    ]
    body = "".join(
        f"<tr><th>{_e(name)}</th><td>{value if value == '&ndash;' else _e(value)}</td></tr>"
        for name, value in rows
    )
    return f"<table class='meta'>{body}</table>"


def _metrics_table(metrics: dict) -> str:
    tuned, base, delta = metrics["tuned"], metrics.get("base"), metrics.get("deltas") or {}
    header = "<tr><th>metric</th><th>tuned</th>"
    if base is not None:
        header += "<th>base</th><th>delta</th>"
    rows = [header + "</tr>"]
    for metric in [*GATE_METRICS, *(name for name in tuned if is_task_metric_name(name))]:
        if tuned.get(metric) is None and (base is None or base.get(metric) is None):
            continue
        row = f"<tr><td>{metric}</td><td class='num'>{_number(tuned.get(metric))}</td>"
        if base is not None:
            change = delta.get(f"delta_{metric}")
            css = ""
            if change and metric != "mean_response_tokens":
                better = change < 0 if metric in _LOWER_IS_BETTER else change > 0
                css = "up" if better else "down"
            shown = "&ndash;" if change is None else f"{change:+.4f}"
            row += f"<td class='num'>{_number(base.get(metric))}</td>"
            row += f"<td class='num {css}'>{shown}</td>"
        rows.append(row + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _paired_table(paired: dict | None) -> str:
    """The paired comparison: the 2x2 table of verdicts, the interval and McNemar's p."""
    if paired is None:
        return ""
    low, high = paired["delta_accuracy_ci_low"], paired["delta_accuracy_ci_high"]
    verdict = (
        "the tuned model is better beyond noise"
        if low > 0
        else "the base model is better beyond noise"
        if high < 0
        else "the difference is within noise"
    )
    counts = (
        ("both right", paired["both_correct"]),
        ("only tuned right", paired["only_tuned_correct"]),
        ("only base right", paired["only_base_correct"]),
        ("both wrong", paired["both_wrong"]),
    )
    rows = "".join(
        f"<tr><td>{name}</td><td class='num'>{count}</td></tr>" for name, count in counts
    )
    return (
        "<h2>Paired comparison</h2>"
        f"<p>delta_accuracy {round(paired['confidence'] * 100)}% interval "
        f"<b>[{low:+.4f}, {high:+.4f}]</b>, McNemar exact p = {paired['mcnemar_p']:.4g} "
        f"on {paired['samples']} prompts: {verdict}.</p>"
        f"<table>{rows}</table><p class='meta'>{_e(paired['method'])}</p>"
    )


def _explanations(metrics: dict) -> str:
    lines = []
    for name in ("tuned", "base"):
        result = metrics.get(name)
        if not result or "samples" not in result:
            continue
        if "verdict_metric" in result:  # a task the harness scored
            lines.append(
                f"<li>{name}: {result.get('correct', '&ndash;')} of {result['samples']} right by "
                f"{_e(result['verdict_metric'])}, {result['n_shot']}-shot</li>"
            )
            continue
        extraction = ", ".join(f"{k} {v}" for k, v in result["answer_extraction"].items())
        lines.append(
            f"<li>{name}: {result['correct']} of {result['samples']} correct; "
            f"{result['truncated']} answers hit --max-new-tokens before the end-of-turn token; "
            f"answers found by: {_e(extraction) or 'none'}; "
            f"{result['generated_tokens_per_second']:.1f} generated tokens/s</li>"
        )
        if result.get("val_target_tokens"):
            lines.append(
                f"<li>{name}: validation loss over {result['val_target_tokens']} target tokens "
                f"in {result['val_documents']} documents</li>"
            )
    for warning in metrics.get("warnings", []):
        lines.append(f"<li class='bad'>{_e(warning)}</li>")
    return f"<ul class='meta'>{''.join(lines)}</ul>" if lines else ""


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= CHART_POINTS:
        return points
    stride = math.ceil(len(points) / CHART_POINTS)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * index / (count - 1) for index in range(count)]


def loss_chart(rows: Sequence[dict], width: int = 720, height: int = 300) -> str:
    """An inline SVG line chart of `loss` (and `val_loss` where present) against `step`."""
    series = {
        "loss": [(float(r["step"]), float(r["loss"])) for r in rows],
        "val_loss": [
            (float(r["step"]), float(r["val_loss"]))
            for r in rows
            if isinstance(r.get("val_loss"), int | float) and not isinstance(r["val_loss"], bool)
        ],
    }
    series = {name: _thin(sorted(points)) for name, points in series.items() if points}
    finite = [(x, y) for points in series.values() for x, y in points if math.isfinite(y)]
    if not finite:
        return "<p class='meta'>The training log has no finite loss values to draw.</p>"
    x_low, x_high = min(x for x, _ in finite), max(x for x, _ in finite)
    y_low, y_high = min(y for _, y in finite), max(y for _, y in finite)
    if x_high == x_low:
        x_high = x_low + 1
    if y_high == y_low:
        y_high = y_low + 1
    left, right, top, bottom = 56, 16, 16, 36
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def y_of(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    colors = {"loss": "#1f6fb2", "val_loss": "#d9822b"}
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"role='img' aria-label='training loss by step'>",
        f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='#fcfcfc' "
        "stroke='#ccc'/>",
    ]
    for y in _ticks(y_low, y_high):
        parts.append(
            f"<line x1='{left}' x2='{left + plot_w}' y1='{y_of(y):.1f}' y2='{y_of(y):.1f}' "
            f"stroke='#eee'/><text x='{left - 6}' y='{y_of(y) + 4:.1f}' "
            f"text-anchor='end'>{y:.3g}</text>"
        )
    for x in _ticks(x_low, x_high):
        parts.append(
            f"<text x='{x_of(x):.1f}' y='{top + plot_h + 16}' text-anchor='middle'>{x:.0f}</text>"
        )
    parts.append(f"<text x='{left + plot_w / 2}' y='{height - 4}' text-anchor='middle'>step</text>")
    for index, (name, points) in enumerate(series.items()):
        drawn = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in points if math.isfinite(y))
        parts.append(
            f"<polyline fill='none' stroke='{colors[name]}' stroke-width='1.5' points='{drawn}'/>"
        )
        legend_y = top + 14 + 16 * index
        parts.append(
            f"<line x1='{left + plot_w - 90}' x2='{left + plot_w - 70}' y1='{legend_y - 4}' "
            f"y2='{legend_y - 4}' stroke='{colors[name]}' stroke-width='2'/>"
            f"<text x='{left + plot_w - 64}' y='{legend_y}'>{name}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _sample_html(sample: dict, other: dict | None) -> str:
    verdict = "correct" if sample["correct"] else "wrong"
    css = "ok" if sample["correct"] else "bad"
    length = ""
    if "response_tokens" in sample:  # megasft's own generation counts tokens
        cut = "" if sample["stopped"] else ", cut at --max-new-tokens"
        length = f" &middot; {sample['response_tokens']} tokens{cut}"
    parts = [
        "<div class='sample'>",
        f"<div class='meta'>{_e(sample['source'])}, row {sample['row']} &middot; "
        f"<span class='{css}'>{verdict}</span> &middot; answer {_e(sample['extracted_answer'])} "
        f"({_e(sample['extraction_method'])}) vs reference {_e(sample['reference_answer'])}"
        f"{length}</div>",
        f"<details><summary>prompt</summary><pre>{_e(sample['prompt'])}</pre></details>",
        f"<div>{sample['model']} answer:</div><pre>{_e(sample['prediction'])}</pre>",
    ]
    if other is not None:
        parts.append(
            f"<div>{other['model']} answer ({'correct' if other['correct'] else 'wrong'}):</div>"
            f"<pre>{_e(other['prediction'])}</pre>"
        )
    if sample.get("reference") is not None:
        parts.append(
            f"<details><summary>reference</summary><pre>{_e(sample['reference'])}</pre></details>"
        )
    parts.append("</div>")
    return "".join(parts)


def _sample_sections(samples: Sequence[dict], has_base: bool) -> str:
    tuned = [sample for sample in samples if sample["model"] == "tuned"]
    base = {sample["index"]: sample for sample in samples if sample["model"] == "base"}
    sections = [
        ("Right answers", [s for s in tuned if s["correct"]]),
        ("Wrong answers", [s for s in tuned if not s["correct"]]),
    ]
    if has_base:
        sections += [
            (
                "Broken by tuning (base right, tuned wrong)",
                [s for s in tuned if not s["correct"] and base[s["index"]]["correct"]],
            ),
            (
                "Fixed by tuning (base wrong, tuned right)",
                [s for s in tuned if s["correct"] and not base[s["index"]]["correct"]],
            ),
        ]
    parts = []
    for title, chosen in sections:
        parts.append(f"<h2>{_e(title)} ({len(chosen)})</h2>")
        if not chosen:
            parts.append("<p class='meta'>none</p>")
        for sample in chosen[:SAMPLES_PER_SECTION]:
            parts.append(_sample_html(sample, base.get(sample["index"]) if has_base else None))
        if len(chosen) > SAMPLES_PER_SECTION:
            parts.append(
                f"<p class='meta'>{len(chosen) - SAMPLES_PER_SECTION} more in samples.jsonl</p>"
            )
    return "\n".join(parts)
