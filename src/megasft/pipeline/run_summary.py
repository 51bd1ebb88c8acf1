"""The links and the GitHub Actions job summary of a submitted run (`megasft pipeline submit`).

See docs/pipeline.md, "Submitting to Kubeflow".
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from megasft.pipeline.config import PipelineConfig
from megasft.pipeline.steps.common import experiment_name

if TYPE_CHECKING:
    from megasft.pipeline.submit import Submission


def mlflow_link(config: PipelineConfig, kfp_run_id: str) -> str | None:
    """A link to the run's MLflow parent run (tagged kfp.run_id), else to its experiment.

    Best effort: None when no MLflow server URL is known; the server's base URL when it
    cannot be asked.

    Args:
        config: the submitted configuration (its tracking URI and experiment).
        kfp_run_id: the KFP run's id.

    Returns:
        The link, or None.
    """
    base = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or str(config.tracking.uri or "")
    if not base.startswith(("http://", "https://")):
        return None
    base = base.rstrip("/")
    try:
        query = urllib.parse.urlencode({"experiment_name": experiment_name(config)})
        found = _get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")
        experiment_id = found["experiment"]["experiment_id"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return base
    link = f"{base}/#/experiments/{experiment_id}"
    try:
        search = {
            "experiment_ids": [experiment_id],
            "filter": f"tags.`kfp.run_id` = '{kfp_run_id}'",
            "max_results": 1,
        }
        runs = _get_json(f"{base}/api/2.0/mlflow/runs/search", search).get("runs") or []
        return f"{link}/runs/{runs[0]['info']['run_id']}" if runs else link
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
        return link


def _get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def write_step_summary(config: PipelineConfig, submission: Submission, state: str | None) -> None:
    """Append a Markdown summary of the run to `$GITHUB_STEP_SUMMARY`, when that is set.

    Args:
        config: the submitted configuration.
        submission: what was submitted.
        state: the run's final state, or None when it was not waited for.
    """
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    mlflow = mlflow_link(config, submission.run_id)
    version = submission.pipeline_version + (" (uploaded)" if submission.version_uploaded else "")
    rows = [
        ("configuration", f"`{config.name}`"),
        ("state", state or "submitted (not waited for)"),
        ("Kubeflow run", f"[{submission.run_name}]({submission.run_link})"),
        ("experiment", submission.experiment),
        ("pipeline version", version),
        ("MLflow", f"[{mlflow}]({mlflow})" if mlflow else "no http(s) tracking URI known"),
    ]
    lines = [f"### megasft-sft: {config.name}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    with open(path, "a", encoding="utf-8") as summary:
        summary.write("\n".join(lines) + "\n\n")
