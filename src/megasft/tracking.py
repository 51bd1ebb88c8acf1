"""MLflow for the pipeline: one parent run per pipeline run, one nested run per step.

    run_id = start_pipeline_run(uri, "megasft-sft", run_name="gsm8k-llama",
                                tags={"kfp.run_id": ...}, params={"seq_length": 2048})
    with step_run(uri, run_id, "prepare", params={...}) as step:
        step.log_dataset("data/", name="train", context="training", source="raw.jsonl",
                         digest=sha256_of_raw)
        step.log_artifact("data/manifest.json")
    with step_run(uri, run_id, "train") as step, training_tracking(uri, step.run_id):
        run_training(config)  # rank 0 logs its per-step metrics into the step's run
    with step_run(uri, run_id, "register") as step:
        step.log_hf_model("hf/", registered_name="megasft-gsm8k", alias="champion")
    end_pipeline_run(uri, run_id, "FINISHED")

Runs. The parent run carries the pipeline's tags (the caller's, e.g. the KFP run id, plus the
git commit as `mlflow.source.git.commit` and `megasft.version`) and parameters; each step is a
run tagged `mlflow.parentRunId` (how the MLflow UI nests runs) in the parent's experiment.
`megasft.managed=true` marks the runs this module created: only those are ended here.

Kubeflow's own MLflow integration. When it is on, KFP creates a parent run per pipeline run and a
nested run per task, and gives each task's container MLFLOW_TRACKING_URI and MLFLOW_RUN_ID (the
task's nested run). Then: MLFLOW_TRACKING_URI wins over the configured URI; the pipeline run is
KFP's parent run (not a second one); a step logs into its task's run instead of nesting another
under it; and KFP, not this module, ends those runs.

Failures. The tracking server is a convenience, not a dependency of the pipeline: every call here
is safe to make. A server that cannot be used (connection refused, timeouts, 5xx after the
client's retry, authentication refused) is reported once on stderr and skipped for the rest of
the process: one failed call costs at most the HTTP timeout times (1 + retries) of
HTTP_SETTINGS, later calls cost nothing. A request the server refuses (a 4xx: a parameter logged
twice with different values, an unknown run) is warned about and skipped on its own. Everything
that was not logged is listed, with why, in `StepRun.unlogged`, for the step's summary. Mistakes in
the caller's arguments (a missing file, an unknown status) raise, whether tracking is on or not.

Nothing here imports mlflow until it is used (the import alone takes seconds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from megasft import __version__

T = TypeVar("T")

# Fail fast instead of the client's default of 7 retries with backoff and a 120 s timeout per
# request. Set only where the environment does not set them already (a server that is slow to
# acknowledge multi-GB model uploads may need a longer MLFLOW_HTTP_REQUEST_TIMEOUT).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_RUN_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
VERSION_TAG = "megasft.version"
KFP_RUN_ID_TAG = "kfp.run_id"
"""The tag `find_pipeline_run` looks the pipeline run up by; the caller sets it."""
STEP_TAG = "megasft.step"
MANAGED_TAG = "megasft.managed"
""""true" on runs this module created, and so ends; absent on runs KFP (or a user) made."""
DIGEST_TAG = "megasft.digest"
"""Dataset input tag with the caller's whole digest (MLflow keeps at most 36 characters)."""

GIT_COMMIT_ENV = "MEGASFT_GIT_COMMIT"
"""The git commit to tag runs with, for images built without the .git directory."""
RUN_ID_ENV = "MEGASFT_MLFLOW_RUN_ID"
"""The run training logs into (set by `training_tracking_env`); empty: training logs nothing."""
TRACKING_URI_ENV = "MEGASFT_MLFLOW_TRACKING_URI"
"""The tracking URI of RUN_ID_ENV's run."""

MAX_PARAM_LENGTH = 500  # what every MLflow server accepts (newer ones take 6000)
MAX_TAG_LENGTH = 5000
MAX_BATCH_PARAMS = 100  # MLflow's limits per log_batch request
MAX_BATCH_METRICS = 1000
MAX_DIGEST_LENGTH = 32  # of MLflow's 36, without an "sha256:"-style prefix
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


# --- the pipeline's run -------------------------------------------------------------------------


def start_pipeline_run(
    tracking_uri: str | None,
    experiment: str,
    *,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
) -> str | None:
    """The pipeline's parent run: created in `experiment`, or, under KFP's MLflow integration
    (MLFLOW_RUN_ID set), KFP's own run, which gets the tags and params instead. Returns its id,
    or None when tracking is off (no URI) or the server cannot be used."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None
    connection = _connection(uri)
    run_tags = {**standard_tags(), **tags}

    def start(client) -> str:
        inherited = os.environ.get("MLFLOW_RUN_ID")
        if inherited:
            # KFP's MLFLOW_RUN_ID is this task's nested run; the pipeline's run is its parent.
            # Without a parent (a run a user exported), it is the pipeline's run itself.
            run_id = client.get_run(inherited).data.tags.get(PARENT_RUN_TAG, inherited)
            _set_tags(client, run_id, run_tags)
            return run_id
        experiment_id = _experiment_id(client, experiment)
        run_tags[MANAGED_TAG] = "true"
        run = client.create_run(experiment_id, run_name=run_name, tags=_tag_values(run_tags))
        return run.info.run_id

    run_id = connection.call("the pipeline run", start, unlogged=[])
    if run_id is not None:
        _log_params(connection, run_id, params, "the pipeline run's params", unlogged=[])
    return run_id


def find_pipeline_run(tracking_uri: str | None, experiment: str, kfp_run_id: str) -> str | None:
    """The pipeline run `start_pipeline_run` made for KFP run `kfp_run_id` (tagged
    `kfp.run_id`), for a later process such as the exit handler; under KFP's MLflow
    integration, KFP's parent run. None when there is none, or tracking is off or unusable."""
    if "'" in kfp_run_id:
        raise ValueError(f"find_pipeline_run: a KFP run id has no quotes: {kfp_run_id!r}")
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None

    def find(client) -> str | None:
        inherited = os.environ.get("MLFLOW_RUN_ID")
        if inherited:
            return client.get_run(inherited).data.tags.get(PARENT_RUN_TAG, inherited)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run_id}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    return _connection(uri).call(f"the pipeline run of KFP run {kfp_run_id}", find, unlogged=[])


def ensure_experiment(
    tracking_uri: str | None, experiment: str, *, artifact_location: str | None = None
) -> str | None:
    """The experiment's id, creating it (with `artifact_location`, e.g. a file:// URI beside an
    embedded sqlite store) when it does not exist yet. None when tracking is off or unusable."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None
    return _connection(uri).call(
        f"the experiment {experiment}",
        lambda client: _experiment_id(client, experiment, artifact_location),
        unlogged=[],
    )


def end_pipeline_run(tracking_uri: str | None, run_id: str | None, status: str) -> None:
    """Ends the pipeline's run with `status` (FINISHED, FAILED or KILLED), if this module created
    it; KFP ends its own. Does nothing without a run."""
    _check_status(status)
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None or not run_id:
        return

    def end(client) -> None:
        if client.get_run(run_id).data.tags.get(MANAGED_TAG) == "true":
            client.set_terminated(run_id, status=status)

    _connection(uri).call(f"the end of the pipeline run ({status})", end, unlogged=[])


# --- a step's run -------------------------------------------------------------------------------


@contextmanager
def step_run(
    tracking_uri: str | None,
    parent_run_id: str | None,
    step: str,
    *,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[StepRun]:
    """A run for one step, nested under the pipeline's run (or KFP's run for this task, when
    MLFLOW_RUN_ID names a child of `parent_run_id`). A run it created ends FINISHED, or FAILED
    when the body raises (KILLED for KeyboardInterrupt/SystemExit); the exception goes on.

    With tracking off, or no parent run, the StepRun's methods do nothing (they still check
    their arguments)."""
    uri = resolve_tracking_uri(tracking_uri)
    created = False
    if uri is None:
        run = StepRun(step)
    elif not parent_run_id:
        run = StepRun(step, skip_reason="no pipeline run to nest under (tracking unavailable)")
    else:
        connection = _connection(uri)
        step_tags = {STEP_TAG: step, **(tags or {})}

        def open_run(client) -> tuple[str, bool]:
            task_run = _kfp_task_run(client, parent_run_id)
            if task_run is not None:
                _set_tags(client, task_run, step_tags)
                return task_run, False
            experiment_id = client.get_run(parent_run_id).info.experiment_id
            run_tags = {PARENT_RUN_TAG: parent_run_id, MANAGED_TAG: "true", **step_tags}
            run = client.create_run(experiment_id, run_name=step, tags=_tag_values(run_tags))
            return run.info.run_id, True

        unlogged: list[str] = []
        opened = connection.call(f"the run of step {step}", open_run, unlogged)
        if opened is None:
            run = StepRun(step, skip_reason=f"no run for step {step}", unlogged=unlogged)
        else:
            run_id, created = opened
            run = StepRun(step, connection, run_id, unlogged=unlogged)
    if params:
        run.log_params(params)
    try:
        yield run
    except BaseException as error:
        if created:
            run._terminate("FAILED" if isinstance(error, Exception) else "KILLED")
        raise
    if created:
        run._terminate("FINISHED")


class StepRun:
    """One step's MLflow run. Every method is safe to call: what the server does not take is
    listed in `unlogged` instead of raising."""

    def __init__(
        self,
        step: str,
        connection: _Connection | None = None,
        run_id: str | None = None,
        *,
        skip_reason: str | None = None,
        unlogged: list[str] | None = None,
    ):
        self.step = step
        self.run_id = run_id
        self.model_uri: str | None = None
        """`models:/<id>` of the model `log_hf_model` logged."""
        self._connection = connection
        self._skip_reason = skip_reason  # None with tracking off: nothing to report then
        self._unlogged = unlogged if unlogged is not None else []

    @property
    def unlogged(self) -> list[str]:
        """What was not logged, each with why ("metrics loss at step 3: MLflow at ... unreachable
        (...)"); empty when everything was, or when tracking is off."""
        return list(self._unlogged)

    def log_params(self, params: dict[str, Any]) -> None:
        """Parameters; nested dicts become dotted names, values are strings cut to 500 chars."""
        what = f"params {_names(params)}"
        if self._active(what):
            _log_params(self._connection, self.run_id, params, what, self._unlogged)

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Metrics (None values are left out) at `step` (0 when None)."""
        values = {key: float(value) for key, value in metrics.items() if value is not None}
        what = f"metrics {_names(values)}" + (f" at step {step}" if step is not None else "")
        if not values or not self._active(what):
            return

        def log(client) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            entries = [Metric(key, value, now, step or 0) for key, value in values.items()]
            for start in range(0, len(entries), MAX_BATCH_METRICS):
                client.log_batch(self.run_id, metrics=entries[start : start + MAX_BATCH_METRICS])

        self._connection.call(what, log, self._unlogged)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (under `artifact_path`), or a directory's contents (under `artifact_path`,
        by default the directory's own name)."""
        path = _existing(path)
        what = f"artifact {path}"
        if not self._active(what):
            return

        def log(client) -> None:
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
            else:
                client.log_artifact(self.run_id, str(path), artifact_path)

        self._connection.call(what, log, self._unlogged)

    def log_dataset(
        self, path: str | Path, *, name: str, context: str, source: str, digest: str
    ) -> None:
        """A dataset input of the run (MLflow's "Datasets used"): a `megasft prepare` output
        directory (its schema, and rows and tokens from manifest.json as the profile) or a raw
        data file. `source` is where the raw data came from (path or URI), `digest` its content
        hash; MLflow keeps a digest of at most 36 characters, so the whole one goes into the
        input's `megasft.digest` tag and the profile too. `context`: training, validation,
        evaluation, ..."""
        path = _existing(path)
        for argument, value in (("name", name), ("context", context), ("digest", digest)):
            if not value:
                raise ValueError(f"log_dataset: {argument} must not be empty")
        schema, profile = _dataset_description(path)
        profile["source_digest"] = digest
        what = f"dataset {name} ({context}) from {source}"
        if not self._active(what):
            return

        def log(client) -> None:
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            source_type, source_json = _dataset_source(source)
            dataset = Dataset(
                name=name,
                digest=mlflow_digest(digest),
                source_type=source_type,
                source=source_json,
                schema=schema() if schema else None,
                profile=json.dumps(profile),
            )
            input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag(DIGEST_TAG, digest)]
            client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, input_tags)])

        self._connection.call(what, log, self._unlogged)

    def log_hf_model(
        self,
        model_dir: str | Path,
        *,
        registered_name: str | None = None,
        alias: str | None = None,
    ) -> str | None:
        """Logs a Hugging Face model directory (config.json, safetensors, tokenizer files) as
        this run's model and, with `registered_name`, registers it as a new version of that
        model, with `alias` pointing at it. Returns the version, or None.

        How: an MLflow 3 logged model (`create_logged_model`, its files uploaded as they are,
        linked to the run as an output) whose `models:/<id>` URI becomes the registered version's
        source. Not `mlflow.transformers.log_model`: that loads the whole model with transformers
        and torch (minutes and the model's size in memory, for a 70B model more than the step's
        pod has) to write an MLmodel file that serving would read; here the files are copied and
        nothing is loaded. Consumers load it with
        `mlflow.artifacts.download_artifacts("models:/NAME@ALIAS")` and then
        `AutoModelForCausalLM.from_pretrained` on the directory it returns.
        """
        model_dir = _existing(model_dir)
        config_file = model_dir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} does not exist: not a Hugging Face model")
        if alias is not None:
            if registered_name is None:
                raise ValueError("log_hf_model: an alias needs a registered_name")
            if not ALIAS_PATTERN.fullmatch(alias) or re.fullmatch(r"[vV]\d+|latest", alias):
                raise ValueError(
                    f"log_hf_model: alias {alias!r} must be letters, digits, _ and -, and not "
                    "'latest' or v<number> (MLflow reserves those)"
                )
        config = json.loads(config_file.read_text(encoding="utf-8"))
        model_tags = {
            "megasft.format": "huggingface",
            "hf.model_type": str(config.get("model_type", "")),
            "hf.architectures": ",".join(config.get("architectures") or []),
        }
        if not self._active(f"model {model_dir}"):
            return None

        def log_model(client) -> str:
            from mlflow.entities import LoggedModelOutput

            experiment_id = client.get_run(self.run_id).info.experiment_id
            model = client.create_logged_model(
                experiment_id, name="model", source_run_id=self.run_id, tags=model_tags
            )
            client.log_model_artifacts(model.model_id, str(model_dir))
            client.finalize_logged_model(model.model_id, "READY")
            client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
            return model.model_id

        model_id = self._connection.call(f"model {model_dir}", log_model, self._unlogged)
        if model_id is None:
            return None
        self.model_uri = f"models:/{model_id}"
        if registered_name is None:
            return None

        def register(client) -> str:
            from mlflow.exceptions import MlflowException

            try:
                client.create_registered_model(registered_name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            # The client resolves a models:/ source through the global tracking URI, not its
            # own: without this it looks for the model in ./mlflow.db.
            previous = os.environ.get("MLFLOW_TRACKING_URI")
            os.environ["MLFLOW_TRACKING_URI"] = self._connection.uri
            try:
                version = client.create_model_version(
                    registered_name,
                    source=self.model_uri,
                    run_id=self.run_id,
                    model_id=model_id,
                    await_creation_for=0,  # the OSS registry makes versions READY at once
                ).version
            finally:
                if previous is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = previous
            if alias is not None:
                client.set_registered_model_alias(registered_name, alias, version)
            return str(version)

        what = f"registration of {self.model_uri} as {registered_name}" + (
            f"@{alias}" if alias else ""
        )
        return self._connection.call(what, register, self._unlogged)

    def _active(self, what: str) -> bool:
        """Whether there is a run to log into; records `what` as unlogged when there is not."""
        if self.run_id is not None:
            return True
        if self._skip_reason is not None:
            self._unlogged.append(f"{what}: {self._skip_reason}")
        return False

    def _terminate(self, status: str) -> None:
        self._connection.call(
            f"the end of step {self.step} ({status})",
            lambda client: client.set_terminated(self.run_id, status=status),
            self._unlogged,
        )


# --- training's run -----------------------------------------------------------------------------


def training_tracking_env(tracking_uri: str | None, run_id: str | None) -> dict[str, str]:
    """Environment for the training processes (torchrun ranks inherit it) so that rank 0's
    `megasft.train.tracking.MetricsTracker` logs its per-step metrics into `run_id` (the train
    step's run) instead of a run of its own; without a run, training logs nothing."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None or not run_id:
        return {RUN_ID_ENV: ""}
    return {TRACKING_URI_ENV: uri, RUN_ID_ENV: run_id}


@contextmanager
def training_tracking(tracking_uri: str | None, run_id: str | None) -> Iterator[None]:
    """`training_tracking_env` set in os.environ for the duration, for `run_training` in this
    process (it starts torchrun with this process's environment)."""
    values = training_tracking_env(tracking_uri, run_id)
    saved = {name: os.environ.get(name) for name in (RUN_ID_ENV, TRACKING_URI_ENV)}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def training_run(tracking_uri: str | None) -> tuple[str | None, str | None]:
    """(tracking URI, run id) for training's metrics: the run `training_tracking_env` names,
    else KFP's MLFLOW_RUN_ID, else (URI, None): a run of its own. (None, None): log nothing."""
    if RUN_ID_ENV in os.environ:
        run_id = os.environ[RUN_ID_ENV]
        uri = os.environ.get(TRACKING_URI_ENV) or resolve_tracking_uri(tracking_uri)
        return (uri, run_id) if uri and run_id else (None, None)
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None, None
    return uri, os.environ.get("MLFLOW_RUN_ID") or None


# --- shared pieces ------------------------------------------------------------------------------


def resolve_tracking_uri(tracking_uri: str | None) -> str | None:
    """MLFLOW_TRACKING_URI when set (KFP's integration sets it), else `tracking_uri`; None (or
    "") means tracking is off."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or None


def apply_http_settings() -> None:
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


def is_rejection(error: BaseException) -> bool:
    """Whether the server answered and refused just this request (4xx: a bad value, a parameter
    logged twice with different values, an unknown run), as opposed to a server that cannot be
    used at all (unreachable, timed out, 5xx after the retry, authentication refused)."""
    status_code = getattr(error, "get_http_status_code", None)  # MlflowException's
    if status_code is None:
        return False
    status = status_code()
    return 400 <= status < 500 and status not in (401, 403)


def standard_tags() -> dict[str, str]:
    """Tags every pipeline run gets: the megasft version and, when known, the git commit."""
    tags = {VERSION_TAG: __version__}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags


def git_commit() -> str | None:
    """MEGASFT_GIT_COMMIT, else HEAD of the checkout this package runs from (an editable
    install), else None (an installed wheel: its directory is no checkout of megasft)."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    package = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-prefix", "HEAD"],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.split()
    # --show-prefix is the package's path in the work tree: "src/megasft/" in megasft's own
    # checkout, ".../site-packages/megasft/" for a venv that happens to sit inside some repository.
    if result.returncode != 0 or len(lines) != 2 or "site-packages" in lines[0]:
        return None
    return lines[1]


def mlflow_digest(digest: str) -> str:
    """The digest as MLflow stores it (at most 36 characters): short ones as they are, long ones
    without an "algorithm:" prefix, cut to their first 32 characters."""
    if len(digest) <= 36:
        return digest
    return digest.split(":", 1)[-1][:MAX_DIGEST_LENGTH]


class _Connection:
    """The client for one tracking URI and whether it is still worth calling."""

    def __init__(self, uri: str):
        self.uri = uri
        self.unreachable: str | None = None  # why, once a call found the server unusable
        self._client = None

    def call(self, what: str, action: Callable[[Any], T], unlogged: list[str]) -> T | None:
        """`action(client)`, or None when the server cannot be used or refuses it; then `what`
        goes into `unlogged` with the reason. Errors other than MLflow's and the network's are
        bugs and raise."""
        if self.unreachable is not None:
            unlogged.append(f"{what}: MLflow at {self.uri} unreachable ({self.unreachable})")
            return None
        try:
            if self._client is None:
                apply_http_settings()
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return action(self._client)
        except Exception as error:
            if not _is_tracking_error(error):
                raise
            reason = _describe(error)
            if is_rejection(error):
                unlogged.append(f"{what}: refused by MLflow at {self.uri} ({reason})")
                _warn(f"MLflow at {self.uri} refused {what}: {reason}")
            elif isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
                unlogged.append(f"{what}: {reason}")  # a local file, not the server
                _warn(f"could not log {what}: {reason}")
            else:
                self.unreachable = reason
                unlogged.append(f"{what}: MLflow at {self.uri} unreachable ({reason})")
                _warn(f"MLflow at {self.uri} unreachable: {reason}; continuing without tracking")
            return None


_connections: dict[str, _Connection] = {}


def _connection(uri: str) -> _Connection:
    if uri not in _connections:
        _connections[uri] = _Connection(uri)
    return _connections[uri]


def _is_tracking_error(error: Exception) -> bool:
    """MLflow's errors (its HTTP errors are MlflowExceptions), the network's, a missing mlflow."""
    if isinstance(error, OSError | ImportError):
        return True
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(error, MlflowException | requests.RequestException)


def _describe(error: Exception) -> str:
    """One line: for a failed request, the URL and the cause at the bottom of urllib3's
    "Max retries exceeded ... Caused by ..." chain; else the error's first 300 characters."""
    text = " ".join(str(error).split())
    cause = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out[^'\"]*", text)
    if text.startswith("API request to") and cause:
        return f"{text.split(' failed', 1)[0]} failed: {cause.group(0).strip()}"
    return f"{type(error).__name__}: {text[:300]}"


def _warn(message: str) -> None:
    print(f"megasft: warning: {message}", file=sys.stderr, flush=True)


def _experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:  # another step created it in between
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _kfp_task_run(client, parent_run_id: str) -> str | None:
    """KFP's nested run for this task: MLFLOW_RUN_ID, when it is a child of the pipeline run."""
    inherited = os.environ.get("MLFLOW_RUN_ID")
    if not inherited or inherited == parent_run_id:
        return None
    tags = client.get_run(inherited).data.tags
    return inherited if tags.get(PARENT_RUN_TAG) == parent_run_id else None


def _set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _tag_values(tags).items()])


def _tag_values(tags: dict[str, Any]) -> dict[str, str]:
    return {key: str(value)[:MAX_TAG_LENGTH] for key, value in tags.items()}


def _log_params(
    connection: _Connection, run_id: str, params: dict[str, Any], what: str, unlogged: list[str]
) -> None:
    flat = _flatten(params)
    if not flat:
        return

    def log(client) -> None:
        from mlflow.entities import Param

        entries = [Param(key, value) for key, value in flat.items()]
        for start in range(0, len(entries), MAX_BATCH_PARAMS):
            client.log_batch(run_id, params=entries[start : start + MAX_BATCH_PARAMS])

    connection.call(what, log, unlogged)


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def _names(values: dict[str, Any]) -> str:
    names = sorted(values)
    return ",".join(names[:5]) + (f",... ({len(names)})" if len(names) > 5 else "")


def _check_status(status: str) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, not {status!r}")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: nothing to log")
    return path


def _dataset_source(source: str) -> tuple[str, str]:
    """(source type, source JSON) as mlflow.data describes `source`: local, s3, gs, http, ...;
    "external" with the URI for schemes it has no resolver for (hf://, ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    if "://" not in source:
        source = str(Path(source).absolute())
    try:
        with warnings.catch_warnings():  # local paths match two resolvers, both the same class
            warnings.simplefilter("ignore")
            resolved = resolve_dataset_source(source)
    except MlflowException:
        return "external", json.dumps({"uri": source})
    return resolved._get_source_type(), resolved.to_json()


def _dataset_description(path: Path) -> tuple[Callable[[], str] | None, dict[str, Any]]:
    """(schema JSON maker or None, profile) of a prepared dataset directory or a raw file."""
    if path.is_file():
        return None, {"bytes": path.stat().st_size}
    from megasft.data.store import read_manifest

    manifest = read_manifest(path)  # InputError for a directory that is no `prepare` output
    profile = {
        key: manifest.get(key)
        for key in ("examples", "tokens", "loss_tokens", "packing_efficiency", "rows_read")
    }
    profile["rejected"] = (manifest.get("rejected") or {}).get("total")
    profile["splits"] = {
        split: {key: stats.get(key) for key in ("rows", "examples", "tokens", "loss_tokens")}
        for split, stats in (manifest.get("splits") or {}).items()
    }
    profile["sources"] = [
        {"path": source.get("path"), "sha256": source.get("sha256")}
        for source in manifest.get("sources") or []
    ]
    return _example_schema_json, profile


def _example_schema_json() -> str:
    """EXAMPLE_SCHEMA (the Arrow rows) as an MLflow schema, in the JSON form mlflow.data uses."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    from megasft.data.store import EXAMPLE_SCHEMA

    columns = []
    for field in EXAMPLE_SCHEMA:
        if not (pa.types.is_list(field.type) and pa.types.is_integer(field.type.value_type)):
            raise TypeError(f"no MLflow type for the Arrow column {field.name}: {field.type}")
        columns.append(ColSpec(Array(DataType.integer), field.name))
    return json.dumps({"mlflow_colspec": Schema(columns).to_dict()})
