"""One pipeline step's MLflow run: `step_run` opens it nested under the pipeline's run (or
uses KFP's run for the task), and `StepRun` logs params, metrics, artifacts, datasets and the
model into it; what the server does not take is listed, never raised. See docs/pipeline.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megasft.tracking.client import (
    DIGEST_TAG,
    MANAGED_TAG,
    PARENT_RUN_TAG,
    STEP_TAG,
    Connection,
    connection,
    log_metrics,
    log_params,
    names,
    resolve_tracking_uri,
    set_tags,
    tag_values,
)
from megasft.tracking.datasets import dataset_description, dataset_source, mlflow_digest

ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


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
        server = connection(uri)
        step_tags = {STEP_TAG: step, **(tags or {})}

        def open_run(client) -> tuple[str, bool]:
            task_run = kfp_task_run(client, parent_run_id)
            if task_run is not None:
                set_tags(client, task_run, step_tags)
                return task_run, False
            experiment_id = client.get_run(parent_run_id).info.experiment_id
            run_tags = {PARENT_RUN_TAG: parent_run_id, MANAGED_TAG: "true", **step_tags}
            run = client.create_run(experiment_id, run_name=step, tags=tag_values(run_tags))
            return run.info.run_id, True

        unlogged: list[str] = []
        opened = server.call(f"the run of step {step}", open_run, unlogged)
        if opened is None:
            run = StepRun(step, skip_reason=f"no run for step {step}", unlogged=unlogged)
        else:
            run_id, created = opened
            run = StepRun(step, server, run_id, unlogged=unlogged)
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
        connection: Connection | None = None,
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
        what = f"params {names(params)}"
        if self._active(what):
            log_params(self._connection, self.run_id, params, what, self._unlogged)

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Metrics (None values are left out) at `step` (0 when None)."""
        values = {key: float(value) for key, value in metrics.items() if value is not None}
        what = f"metrics {names(values)}" + (f" at step {step}" if step is not None else "")
        if not values or not self._active(what):
            return

        log_metrics(self._connection, self.run_id, values, step or 0, what, self._unlogged)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (under `artifact_path`), or a directory's contents (under `artifact_path`,
        by default the directory's own name)."""
        path = existing(path)
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
        path = existing(path)
        for argument, value in (("name", name), ("context", context), ("digest", digest)):
            if not value:
                raise ValueError(f"log_dataset: {argument} must not be empty")
        schema, profile = dataset_description(path)
        profile["source_digest"] = digest
        what = f"dataset {name} ({context}) from {source}"
        if not self._active(what):
            return

        def log(client) -> None:
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            source_type, source_json = dataset_source(source)
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
        model_dir = existing(model_dir)
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


def kfp_task_run(client, parent_run_id: str) -> str | None:
    """KFP's nested run for this task: MLFLOW_RUN_ID, when it is a child of the pipeline run."""
    inherited = os.environ.get("MLFLOW_RUN_ID")
    if not inherited or inherited == parent_run_id:
        return None
    tags = client.get_run(inherited).data.tags
    return inherited if tags.get(PARENT_RUN_TAG) == parent_run_id else None


def existing(path: str | Path) -> Path:
    """`path`, which must exist: a caller's mistake raises whether tracking is on or not."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: nothing to log")
    return path
