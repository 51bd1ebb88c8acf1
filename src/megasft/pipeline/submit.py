"""`megasft pipeline submit`: upload the SFT pipeline to Kubeflow Pipelines and start a run.

    megasft pipeline submit --host URL [--config NAME|PATH] [--experiment NAME] [--wait]
                            [--timeout SECONDS] [--run-name NAME] [--namespace NAMESPACE]

1. Compile the pipeline (megasft.pipeline.compile) into a temporary YAML file.
2. Find the pipeline `megasft-sft` and its version `<package version>-<sha256 of the YAML, 10 hex>`:
   an unchanged pipeline reuses its version; a changed one (new code, other images) uploads a
   new version; the first submission uploads the pipeline.
3. Find or create the experiment (--experiment, or the configuration's name).
4. Create a run of that version whose parameters are `config.arguments()`, and print its id and
   its link in the Kubeflow UI on stdout (progress goes to stderr).
5. With --wait, poll the run until it ends.

Exit codes: 0 when the run was created (without --wait) or succeeded; 1 when it ended in any
other state (FAILED, CANCELED, SKIPPED), after printing the state and the error; 3 when
--timeout passed first; 130 on Ctrl-C while waiting. In the last two cases the run keeps going
in Kubeflow. Problems before the run exists (endpoint unreachable, not authorized, upload
refused) raise MegasftError, which the CLI turns into exit 2.

Authentication, first match wins:
- `KFP_TOKEN`: a bearer token (an OIDC token your Kubeflow ingress accepts, or a Kubernetes
  ServiceAccount token with the audience `pipelines.kubeflow.org`);
- the file in `KF_PIPELINES_SA_TOKEN_PATH` (default /var/run/secrets/kubeflow/pipelines/token):
  the projected ServiceAccount token a pod mounts, re-read on every request as the kubelet
  refreshes it (the retraining CronJob works this way);
- none: a `kubectl port-forward` to the KFP API server, or a standalone KFP without auth.
kfp.Client reads in-cluster and kubeconfig credentials only when it is given no host, and
`--host` is required here, so neither is used.

The UI link is `{host}/#/runs/details/{run_id}`; set `KF_PIPELINES_UI_ENDPOINT` (kfp's own
variable) when the UI lives elsewhere than the API, e.g. for the in-cluster API address.
Where `GITHUB_STEP_SUMMARY` is set (a GitHub Actions step), a Markdown summary of the run, with
its Kubeflow and MLflow links, is appended to that file. The MLflow link uses
`MLFLOW_TRACKING_URI` (the server as people reach it), else the configuration's tracking URI
when that is an http(s) URL.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megasft import __version__
from megasft.errors import ConfigError, MegasftError
from megasft.pipeline.config import PipelineConfig

TOKEN_VARIABLE = "KFP_TOKEN"
SA_TOKEN_PATH_VARIABLE = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client's own name for it
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
UI_ENDPOINT_VARIABLE = "KF_PIPELINES_UI_ENDPOINT"  # kfp.client's own name for it

EXIT_SUCCEEDED = 0
EXIT_RUN_FAILED = 1
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130

SUCCEEDED = "SUCCEEDED"
# KFP v2beta1 RuntimeState values in which a run stays; CANCELING is on its way to CANCELED.
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"})
POLL_INTERVAL_S = 15.0
# Consecutive failed status requests tolerated while waiting (an API server restart, a blip).
STATUS_ERRORS_TOLERATED = 5
REQUEST_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Submission:
    """What `submit_pipeline` created or found, for the summary and the tests."""

    run_id: str
    run_link: str
    run_name: str
    experiment: str
    pipeline_version: str
    version_uploaded: bool


def submit_pipeline(
    config: PipelineConfig,
    *,
    host: str,
    experiment: str | None,
    wait: bool,
    timeout_s: float | None,
    run_name: str | None,
    namespace: str | None,
    poll_interval_s: float | None = None,
) -> int:
    """Upload the pipeline if it changed, start a run of `config`, and optionally wait for it.

    Returns the exit code (see the module docstring). `poll_interval_s`: seconds between
    status requests while waiting (default POLL_INTERVAL_S).
    """
    host = _normalized_host(host)
    namespace = namespace or None  # `--namespace ""` (an unset CI variable): single-user KFP
    if timeout_s is not None and timeout_s <= 0:
        raise ConfigError(f"--timeout {timeout_s:g}: give a positive number of seconds")
    experiment = experiment or config.name
    run_name = run_name or f"{config.name}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"

    with tempfile.TemporaryDirectory(prefix="megasft-submit-") as workdir:
        from megasft.pipeline.compile import compile_pipeline

        package = compile_pipeline(Path(workdir) / "sft-pipeline.yaml")
        version_name = pipeline_version_name(package)
        _progress(f"compiled the pipeline: version {version_name}")
        check_endpoint(host)
        client = connect(host, namespace)
        with _api_errors(host, "uploading the pipeline"):
            version_id, pipeline_id, uploaded = ensure_pipeline_version(
                client, package, version_name, namespace
            )
    with _api_errors(host, f"finding or creating the experiment {experiment!r}"):
        found = _quietly(client.create_experiment, experiment, namespace=namespace)
        _progress(f"experiment {experiment} ({found.experiment_id})")
    with _api_errors(host, "creating the run"):
        run = _quietly(
            client.run_pipeline,
            experiment_id=found.experiment_id,
            job_name=run_name,
            params=config.arguments(),
            pipeline_id=pipeline_id,
            version_id=version_id,
        )
    submission = Submission(
        run_id=run.run_id,
        run_link=run_link(host, run.run_id),
        run_name=run_name,
        experiment=experiment,
        pipeline_version=version_name,
        version_uploaded=uploaded,
    )
    print(f"run id: {submission.run_id}")
    print(f"run link: {submission.run_link}")
    sys.stdout.flush()
    if not wait:
        _write_step_summary(config, submission, state=None)
        return EXIT_SUCCEEDED
    if poll_interval_s is None:
        poll_interval_s = POLL_INTERVAL_S
    code, state = wait_for_run(client, submission, timeout_s, poll_interval_s)
    _write_step_summary(config, submission, state=state)
    return code


# -- the pipeline and its version -------------------------------------------------------------


def pipeline_version_name(package: Path) -> str:
    """`<package version>-<first 10 hex of the YAML's sha256>`: equal YAML, equal name."""
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:10]
    return f"{__version__}-{digest}"


def ensure_pipeline_version(
    client: Any, package: Path, version_name: str, namespace: str | None
) -> tuple[str, str, bool]:
    """The version named `version_name` of the pipeline, uploaded if missing.

    Returns (version id, pipeline id, whether anything was uploaded).
    """
    from megasft.pipeline.steps import PIPELINE_NAME

    pipeline_id = _find_by_display_name(
        client.list_pipelines(filter=_name_filter(PIPELINE_NAME), namespace=namespace).pipelines,
        PIPELINE_NAME,
    )
    if pipeline_id is None:
        # KFP names the first version of an uploaded pipeline after the pipeline itself and
        # offers no way to name it, so the named version is uploaded next to it: every run
        # then points at a version whose name says which code it ran.
        pipeline = _quietly(
            client.upload_pipeline,
            str(package),
            pipeline_name=PIPELINE_NAME,
            description="megasft: supervised fine-tuning with megatron-core",
            namespace=namespace,
        )
        pipeline_id = pipeline.pipeline_id
        _progress(f"uploaded the pipeline {PIPELINE_NAME} ({pipeline_id})")
    else:
        versions = client.list_pipeline_versions(
            pipeline_id, filter=_name_filter(version_name), page_size=100
        ).pipeline_versions
        version_id = _find_by_display_name(versions, version_name, key="pipeline_version_id")
        if version_id is not None:
            _progress(f"pipeline {PIPELINE_NAME} version {version_name} unchanged; reusing it")
            return version_id, pipeline_id, False
    version = _quietly(
        client.upload_pipeline_version,
        str(package),
        pipeline_version_name=version_name,
        pipeline_id=pipeline_id,
    )
    _progress(f"uploaded pipeline {PIPELINE_NAME} version {version_name}")
    return version.pipeline_version_id, pipeline_id, True


def _name_filter(name: str) -> str:
    """A v2beta1 Filter (as JSON) for objects whose display name is `name`."""
    # The operation as kfp.Client itself sends it: the enum's number (EQUALS = 1).
    predicate = {"operation": 1, "key": "display_name", "stringValue": name}
    return json.dumps({"predicates": [predicate]})


def _find_by_display_name(items: list | None, name: str, key: str = "pipeline_id") -> str | None:
    # The server filters already; matching again guards against one that ignores the filter.
    matches = [getattr(item, key) for item in items or [] if item.display_name == name]
    if len(matches) > 1:
        raise MegasftError(f"KFP holds {len(matches)} objects named {name!r}; expected one")
    return matches[0] if matches else None


# -- connecting -------------------------------------------------------------------------------


def _normalized_host(host: str) -> str:
    host = host.strip().rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise ConfigError(
            f"--host {host!r}: give the KFP API's URL with its scheme, e.g. "
            "https://kubeflow.example.com/pipeline or http://localhost:8888"
        )
    return host


def _bearer_token() -> tuple[str | None, str]:
    """The token to send and where it came from (for messages); (None, ...) for none."""
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        return token, f"${TOKEN_VARIABLE}"
    path = os.environ.get(SA_TOKEN_PATH_VARIABLE) or DEFAULT_SA_TOKEN_PATH
    if os.path.isfile(path):
        try:
            return Path(path).read_text().strip(), path
        except OSError as error:
            raise MegasftError(f"cannot read the KFP token file {path}: {error}") from error
    return None, "no credentials"


def check_endpoint(host: str) -> None:
    """One quick GET of the health endpoint, for a clear error instead of kfp's retries."""
    token, source = _bearer_token()
    url = f"{host}/apis/v2beta1/healthz"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    hint_auth = (
        f"set {TOKEN_VARIABLE} to a token the endpoint accepts"
        if token is None
        else f"the token from {source} was refused; check it and its audience"
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            body = response.read()
            final_url = response.geturl()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise MegasftError(
                f"KFP at {host}: not authorized (HTTP {error.code}); {hint_auth}"
            ) from error
        if error.code == 404:
            raise MegasftError(
                f"KFP at {host}: no KFP API there ({url} answered 404); give the URL the API "
                "is served at, e.g. https://kubeflow.example.com/pipeline"
            ) from error
        raise MegasftError(f"KFP at {host}: {url} answered HTTP {error.code}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise MegasftError(f"cannot reach KFP at {host}: {reason}") from error
    try:
        json.loads(body)
    except ValueError as error:
        # An ingress that wants a login answers with its sign-in page, after redirects.
        raise MegasftError(
            f"KFP at {host}: {url} answered with a web page from {final_url}, not the KFP API "
            f"(a login page?); {hint_auth}"
        ) from error


def connect(host: str, namespace: str | None) -> Any:
    """A kfp.Client for `host` with the credentials described in the module docstring."""
    import kfp

    options: dict[str, Any] = {"host": host}
    if namespace:
        options["namespace"] = namespace
    token, source = _bearer_token()
    if source == f"${TOKEN_VARIABLE}":
        options["existing_token"] = token
    elif token is not None:
        options["credentials"] = kfp.client.ServiceAccountTokenVolumeCredentials(path=source)
    with warnings.catch_warnings(), _api_errors(host, "connecting"):
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")
        return _quietly(kfp.Client, **options)


@contextlib.contextmanager
def _api_errors(host: str, action: str) -> Iterator[None]:
    """KFP API failures as MegasftErrors that say what failed and what to check."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as error:
        detail = _api_error_message(error)
        hint = ""
        if error.status in (401, 403):
            hint = (
                "; check the token (KFP_TOKEN or the ServiceAccount token) and that its identity "
                "may use pipelines, experiments and runs"
                + (" in that namespace (--namespace)" if error.status == 403 else "")
            )
        raise MegasftError(
            f"KFP at {host}: {action} failed: HTTP {error.status} {detail}{hint}"
        ) from error
    except urllib3.exceptions.HTTPError as error:
        raise MegasftError(f"KFP at {host}: {action} failed: {error}") from error
    except (TimeoutError, ValueError) as error:  # kfp's healthz retries; its name checks
        raise MegasftError(f"KFP at {host}: {action} failed: {error}") from error


def _api_error_message(error: Any) -> str:
    try:
        body = json.loads(error.body or "")
        return str(body.get("message") or body.get("error") or error.reason)
    except (ValueError, AttributeError):
        return str(error.reason or "")


def _quietly(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call kfp, sending what it prints ("Run details: ...") to stderr: stdout is ours."""
    with contextlib.redirect_stdout(sys.stderr):
        return function(*args, **kwargs)


def _progress(message: str) -> None:
    print(f"megasft pipeline submit: {message}", file=sys.stderr)


def run_link(host: str, run_id: str) -> str:
    base = os.environ.get(UI_ENDPOINT_VARIABLE, "").strip().rstrip("/") or host
    return f"{base}/#/runs/details/{run_id}"


# -- waiting ----------------------------------------------------------------------------------


def wait_for_run(
    client: Any,
    submission: Submission,
    timeout_s: float | None,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> tuple[int, str | None]:
    """Poll the run until it ends; returns (exit code, last state seen)."""
    run_id, link = submission.run_id, submission.run_link
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    state: str | None = None
    errors = 0
    try:
        while True:
            try:
                run = client.get_run(run_id)
                errors = 0
            except Exception as error:  # noqa: BLE001 - kfp raises ApiException and urllib3's
                errors += 1
                if errors > STATUS_ERRORS_TOLERATED:
                    raise MegasftError(
                        f"lost contact with KFP while waiting for run {run_id} ({error}); "
                        f"the run is not affected: {link}"
                    ) from error
                _progress(f"reading the run's state failed ({error}); trying again")
            else:
                new_state = str(run.state or "PENDING")
                if new_state != state:
                    _progress(f"run {run_id}: {new_state}")
                state = new_state
                if state in TERMINAL_STATES:
                    return _report_end(run, link), state
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _progress(
                        f"run {run_id} still {state or 'unknown'} after {timeout_s:g} s "
                        f"(--timeout); stopped waiting, the run keeps going: {link}"
                    )
                    return EXIT_TIMEOUT, state
                time.sleep(min(poll_interval_s, remaining))
            else:
                time.sleep(poll_interval_s)
    except KeyboardInterrupt:
        _progress(
            f"stopped waiting (Ctrl-C); run {run_id} keeps running in Kubeflow: {link} "
            "(terminate it there if you meant to stop it)"
        )
        return EXIT_INTERRUPTED, state


def _report_end(run: Any, link: str) -> int:
    if run.state == SUCCEEDED:
        _progress(f"run {run.run_id} succeeded: {link}")
        return EXIT_SUCCEEDED
    lines = [f"run {run.run_id} ended {run.state}: {link}"]
    if run.error is not None and run.error.message:
        lines.append(f"  error: {run.error.message}")
    tasks = run.run_details.task_details if run.run_details is not None else None
    for task in tasks or []:
        if task.state in ("FAILED", "CANCELED") and task.display_name:
            message = task.error.message if task.error is not None else None
            lines.append(
                f"  step {task.display_name}: {task.state}" + (f": {message}" if message else "")
            )
    _progress("\n".join(lines))
    return EXIT_RUN_FAILED


# -- the job summary --------------------------------------------------------------------------


def mlflow_link(config: PipelineConfig, kfp_run_id: str) -> str | None:
    """A link to the run's MLflow parent run (tagged kfp.run_id), else to its experiment.

    Best effort: None when no MLflow server URL is known; the server's base URL when it
    cannot be asked.
    """
    from megasft.pipeline.steps import experiment_name

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


def _write_step_summary(config: PipelineConfig, submission: Submission, state: str | None) -> None:
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
