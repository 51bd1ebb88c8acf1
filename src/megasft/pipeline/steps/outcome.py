"""The steps after training: evaluate, register, and the exit handler `finish`.

See docs/pipeline.md (MLflow, the gate) and docs/evaluate.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from megasft.pipeline.config import evaluate_settings, tracking_config
from megasft.pipeline.steps.common import (
    PIPELINE_NAME,
    ArtifactLike,
    experiment_name_from,
    write_artifact,
)

# -- evaluate ---------------------------------------------------------------------------------


def evaluate(
    evaluate_section: dict[str, Any],
    model: dict[str, Any],
    tracking_section: dict[str, Any],
    *,
    parent_run_id: str,
    tuned: ArtifactLike,
    dataset: ArtifactLike,
    checkpoints: ArtifactLike,
    metrics: Any,
    report: ArtifactLike,
) -> bool:
    """Tuned vs base on the held-out prompts (and validation loss on the val split).

    Args:
        evaluate_section: the `evaluate` section (its `data`: the held-out prompts; without
            it, the prepared dataset's val split).
        model: the `model` section (the base model).
        tracking_section: the `tracking` section.
        parent_run_id: the MLflow parent run ("" for none).
        tuned: the exported HF model's artifact.
        dataset: the prepared Dataset artifact.
        checkpoints: the training output (its metrics.jsonl goes into the report).
        metrics: the KFP Metrics artifact (anything with `log_metric`).
        report: the HTML artifact for the report.

    Returns:
        Whether the gate passed (True when no gate is set).

    Raises:
        ConfigError: a setting is invalid or the prompts cannot be read.
    """
    from megasft import tracking
    from megasft.evaluate import EvaluateConfig
    from megasft.evaluate import evaluate as run_evaluation

    settings = evaluate_settings(evaluate_section)
    prompts = settings.pop("data", None)
    output = Path(tempfile.mkdtemp(prefix="megasft-evaluate-")) / "evaluation"
    training_log = Path(checkpoints.path) / "metrics.jsonl"
    with tracking.step_run(
        tracking_section.get("uri"), parent_run_id or None, "evaluate", params=settings
    ) as run:
        result = run_evaluation(
            EvaluateConfig(
                model=tuned.path,
                baseline=model["path"],
                data=prompts or dataset.path,
                output=str(output),
                val_data=dataset.path if prompts else None,
                tokenizer=model.get("tokenizer"),
                training_log=str(training_log) if training_log.is_file() else None,
                **settings,
            )
        )
        # An lm-eval task's metric is named METRIC,FILTER; MLflow refuses commas in metric
        # names, so the trackers get METRIC/FILTER (metrics.json and the gate keep the comma).
        figures = {
            key.replace(",", "/"): value
            for key, value in result["summary"].items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        run.log_metrics(figures)
        for name in ("metrics.json", "report.html", "samples.jsonl"):
            if (output / name).exists():
                run.log_artifact(output / name, "evaluation")
    shutil.copyfile(output / "report.html", report.path)
    gate = result.get("gate")
    passed = True if gate is None else bool(gate["passed"])
    for key, value in figures.items():
        metrics.log_metric(key, value)
    metrics.log_metric("gate_passed", int(passed))
    key_figures = ("accuracy", "base_accuracy", "delta_accuracy", "val_loss", "base_val_loss")
    key_figures += ("delta_accuracy_ci_low", "delta_accuracy_ci_high", "mcnemar_p")
    report.metadata.update({key: figures[key] for key in key_figures if key in figures})
    report.metadata["gate"] = gate["reason"] if gate else "no gate"
    shutil.rmtree(output.parent, ignore_errors=True)
    return passed


# -- register ---------------------------------------------------------------------------------


def register(
    tracking_section: dict[str, Any],
    *,
    config_name: str,
    parent_run_id: str,
    tuned: ArtifactLike,
    record: ArtifactLike,
) -> str:
    """Log the tuned HF model to MLflow and register it with the configured alias; runs only
    when the evaluation gate passed.

    Args:
        tracking_section: the `tracking` section (registered model name, alias).
        config_name: the configuration's name (the model's name by default).
        parent_run_id: the MLflow parent run ("" for none).
        tuned: the exported HF model's artifact.
        record: the Markdown artifact that says what was registered, or why not.

    Returns:
        The model version ("" when not registered).
    """
    from megasft import tracking

    settings = tracking_config(tracking_section)
    uri = settings.uri
    name = settings.registered_model or config_name
    alias = settings.alias
    with tracking.step_run(uri, parent_run_id or None, "register") as run:
        version = run.log_hf_model(tuned.path, registered_name=name, alias=alias)
        problems = run.unlogged
    if version:
        text = f"Registered **{name}** version {version} with alias `{alias}` (tracking: {uri})."
    else:
        why = "; ".join(problems) if problems else "tracking is off (no tracking.uri)"
        text = f"The gate passed, but the model was not registered: {why}."
        print(f"megasft register: {text}", file=sys.stderr)
    write_artifact(
        record, text + "\n", metadata={"registered_model": name, "version": version or ""}
    )
    return version or ""


# -- the exit handler -------------------------------------------------------------------------


def finish(
    tracking_section: dict[str, Any],
    notify: dict[str, Any],
    *,
    config_name: str,
    kfp_run_id: str,
    state: str,
    error_message: str | None = None,
) -> dict[str, Any]:
    """The pipeline's last word, whatever happened: close the MLflow parent run with the
    run's final state and post it to the webhook, if one is configured. Never raises: a run
    that trained must not turn red because a notification failed.

    Args:
        tracking_section: the `tracking` section.
        notify: the `notify` section (its `webhook`).
        config_name: the configuration's name.
        kfp_run_id: the KFP run's id (finds the MLflow parent run).
        state: the pipeline's final state as KFP reports it.
        error_message: KFP's error message, if any.

    Returns:
        The report that was printed and posted.
    """
    from megasft import tracking

    succeeded = state.upper() in ("SUCCEEDED", "SUCCESS")
    report = {
        "pipeline": PIPELINE_NAME,
        "config": config_name,
        "kfp_run_id": kfp_run_id,
        "state": state,
        "error": error_message or None,
    }
    uri = tracking_section.get("uri")
    parent = uri and tracking.find_pipeline_run(
        uri, experiment_name_from(tracking_section, config_name), kfp_run_id
    )
    if parent:
        tracking.end_pipeline_run(uri, parent, "FINISHED" if succeeded else "FAILED")
        report["mlflow_run_id"] = parent
    webhook = notify.get("webhook")
    if webhook:
        report["webhook"] = post_json(webhook, report)
    print(f"megasft pipeline: {json.dumps(report)}", file=sys.stderr)
    return report


def post_json(url: str, payload: dict[str, Any], timeout_s: float = 10.0) -> str:
    """POST `payload` as JSON; never raises.

    Args:
        url: the webhook.
        payload: the JSON body.
        timeout_s: seconds to wait for the answer.

    Returns:
        "sent (STATUS)", or "failed: WHY".
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return f"sent ({response.status})"
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"megasft pipeline: webhook {url} not notified: {error}", file=sys.stderr)
        return f"failed: {error}"
