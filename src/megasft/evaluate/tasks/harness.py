"""`--task lm-eval:TASK`: an lm-evaluation-harness task, run offline on a local data file.

The harness does what it does for everyone who quotes its numbers: it poses the prompts (its
template and few-shot examples), generates (its HFLM wrapper around the model megasft loaded,
or its vLLM wrapper under `--engine vllm`; its stop sequences) and scores (its filters and
metrics). megasft hands it `--data` in place of the hub dataset and records its metrics under
their harness names (`exact_match,strict-match`). Needs the `lmeval` extra; docs/evaluate.md,
"lm-evaluation-harness".
"""

from __future__ import annotations

import difflib
import functools
import numbers
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megasft.errors import ConfigError, InputError
from megasft.evaluate.tasks import register_task_family
from megasft.evaluate.tasks.base import Extraction, Task

if TYPE_CHECKING:
    from megasft.evaluate.config import EvaluateConfig
    from megasft.evaluate.model import LoadedModel

PREFIX = "lm-eval"
# The harness's stderr of a metric that is not a plain mean (whose stderr is exact) comes from
# bootstrap resampling; its default of 100,000 draws can take minutes on a full test set.
BOOTSTRAP_ITERS = 1000
_DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@register_task_family(PREFIX)
def harness_task(name: str) -> HarnessTask:
    """The task for `--task lm-eval:NAME`.

    Raises:
        ConfigError: when NAME is empty.
    """
    if not name.strip():
        raise ConfigError("--task lm-eval:TASK needs the harness task's name, e.g. lm-eval:gsm8k")
    return HarnessTask(name.strip())


@dataclass
class HarnessPrompts:
    loaded: dict
    """What the harness's TaskManager.load returned: the task, its data read from `source`."""
    harness_name: str
    source: str
    examples: list[dict]
    """The documents evaluated, in order (the first `--limit` of the test split)."""
    metric_names: tuple[str, ...]
    """Every `METRIC,FILTER` the task reports."""
    verdict_metric: str
    """The first metric under the first filter: its per-prompt value is the verdict."""


class HarnessTask(Task):
    extraction_methods = ("none",)
    # The harness's filters find the answer; no format pattern applies.
    default_format_pattern = ""
    needs_reference = False
    metric_names = ("accuracy",)
    uses_chat_template = False
    takes_fewshot = True

    def __init__(self, harness_name: str) -> None:
        self.harness_name = harness_name
        self.name = f"{PREFIX}:{harness_name}"

    def gives_metric(self, name: str) -> bool:
        # Which METRIC,FILTER names the task has is known once it is loaded (`prepare`).
        return name in self.metric_names or "," in name

    # The harness scores its own answers; `answer` never calls these two.
    def reference_answer(self, reference: str) -> str | None:
        return None

    def extract(self, response: str) -> Extraction:
        return Extraction(None, "none")

    def prepare(self, config: EvaluateConfig) -> HarnessPrompts:
        manager = _task_manager()
        entry = manager.task_index.get(self.harness_name)
        if entry is None:
            close = difflib.get_close_matches(self.harness_name, list(manager.task_index), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"--task {self.name}: the harness has no task {self.harness_name!r}{hint}"
            )
        if getattr(entry, "yaml_path", None) is None or entry.kind.name != "TASK":
            raise ConfigError(
                f"--task {self.name}: {self.harness_name!r} is a harness {entry.kind.name.lower()}, "
                "not a single task defined in YAML; name one of its tasks"
            )
        with tempfile.TemporaryDirectory(prefix="megasft-lmeval-") as scratch:
            spec = Path(scratch) / "task.yaml"
            spec.write_text(_spec_yaml(entry.yaml_path, self.harness_name, config, scratch))
            try:
                loaded = manager.load(str(spec))
            except Exception as error:  # the harness and datasets raise many kinds
                raise InputError(
                    f"--task {self.name}: the harness cannot read {config.data} as the task's "
                    f"test split: {type(error).__name__}: {error}"
                ) from error
        task = loaded["tasks"][self.harness_name]
        _apply_settings(task, config)
        examples = list(task.eval_docs)[: config.limit]
        if not examples:
            raise InputError(f"{config.data} has no rows for --task {self.name}")
        filters = [item["name"] for item in task.config.filter_list or []] or ["none"]
        names = tuple(f"{metric},{name}" for name in filters for metric in task.aggregation())
        prompts = HarnessPrompts(loaded, self.harness_name, config.data, examples, names, names[0])
        self._check_gate(config, names)
        return prompts

    def answer(
        self,
        loaded: LoadedModel,
        role: str,
        prompts: HarnessPrompts,
        config: EvaluateConfig,
        warnings: list[str],
    ) -> tuple[dict, list[dict]]:
        import torch
        from lm_eval import evaluator

        language_model = _language_model(loaded, config)
        torch.manual_seed(config.seed)
        started = time.perf_counter()
        output = evaluator.evaluate(
            lm=language_model,
            task_dict=prompts.loaded,
            limit=config.limit,
            log_samples=True,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
        seconds = time.perf_counter() - started
        shots = output["n-shot"][prompts.harness_name]
        if shots and not config.fewshot_data and role == "tuned":  # said once, not per model
            warnings.append(
                f"the {shots}-shot examples were drawn from --data, the evaluated rows (never "
                "the question asked); published numbers draw them from the task's own split: "
                "pass it as --fewshot-data"
            )
        samples = _samples(output["samples"][prompts.harness_name], role, prompts)
        results = output["results"][prompts.harness_name]
        metrics: dict[str, Any] = {
            name: float(results[name])
            for name in prompts.metric_names
            if _is_number(results.get(name))
        }
        verdicts = [sample["correct"] for sample in samples]
        if all(verdict is not None for verdict in verdicts):
            metrics["accuracy"] = sum(verdicts) / len(verdicts)
            metrics["correct"] = sum(verdicts)
        metrics.update(
            samples=len(samples),
            verdict_metric=prompts.verdict_metric,
            stderr={
                name: float(results[stderr])
                for name in prompts.metric_names
                if _is_number(results.get(stderr := name.replace(",", "_stderr,", 1)))
            },
            n_shot=shots,
            generation_seconds=round(seconds, 3),
        )
        return metrics, samples

    def _check_gate(self, config: EvaluateConfig, names: tuple[str, ...]) -> None:
        from megasft.evaluate.metrics import parse_gate

        for condition in parse_gate(config.gate) if config.gate else ():
            if "," in condition.base_metric and condition.base_metric not in names:
                raise ConfigError(
                    f"--gate {condition}: --task {self.name} gives no {condition.base_metric}; "
                    f"its metrics are {', '.join(names)}"
                )


@functools.cache
def _task_manager():
    """The harness's index of its tasks (reading it takes seconds, so once per process)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "--task lm-eval:TASK needs lm-evaluation-harness: pip install 'megasft[lmeval]'"
        ) from None
    return TaskManager()


def _spec_yaml(task_yaml: Path, name: str, config: EvaluateConfig, scratch: str) -> str:
    """A task YAML that includes the harness's own and reads the data from local files: the
    test split from `--data`; the few-shot split from `--fewshot-data`, else from the test
    split (the harness then never shows a question as its own example)."""
    import yaml

    builder = _builder(config.data)
    files = {"test": str(Path(config.data).resolve())}
    if config.fewshot_data:
        if _builder(config.fewshot_data) != builder:
            raise ConfigError("--fewshot-data must have the same file format as --data")
        files["train"] = str(Path(config.fewshot_data).resolve())
    spec = {
        "include": str(task_yaml),
        "task": name,
        "dataset_path": builder,
        "dataset_name": None,
        # keep_in_memory: the scratch cache is deleted once the task is loaded.
        "dataset_kwargs": {"data_files": files, "cache_dir": scratch, "keep_in_memory": True},
        "test_split": "test",
        "validation_split": None,
        "training_split": "train" if config.fewshot_data else None,
        "fewshot_split": "train" if config.fewshot_data else "test",
    }
    return yaml.safe_dump(spec)


def _builder(path: str) -> str:
    suffixes = [suffix.lower() for suffix in Path(path).suffixes if suffix.lower() != ".gz"]
    builder = _DATA_BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise ConfigError(
            f"{path}: an lm-eval task reads {', '.join(_DATA_BUILDERS)} files (gzip'd or not)"
        )
    return builder


def _apply_settings(task: Any, config: EvaluateConfig) -> None:
    """--num-fewshot, the few-shot seed and, where the task sets no limit, --max-new-tokens."""
    if config.num_fewshot is not None:
        task.set_config(key="num_fewshot", value=config.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=config.seed)
    kwargs = task.get_config("generation_kwargs")
    generates = task.get_config("output_type") == "generate_until" and isinstance(kwargs, dict)
    if generates and not any(key in kwargs for key in _MAX_TOKENS_KEYS):
        task.set_config(
            key="generation_kwargs", value={"max_gen_toks": config.max_new_tokens}, update=True
        )


def _language_model(loaded: LoadedModel, config: EvaluateConfig) -> Any:
    """The harness's wrapper of the model: HFLM around the loaded model, or, under
    `--engine vllm`, its vLLM wrapper reading the model's directory (the transformers copy
    leaves the GPU first)."""
    if config.engine == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        from megasft.evaluate.model import free

        free(loaded)
        return VLLM(
            pretrained=str(loaded.hf_path),
            tokenizer=str(loaded.chat_tokenizer.path),
            dtype=loaded.description["dtype"],
            seed=config.seed,
        )
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(loaded.chat_tokenizer.path))
    return HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=config.batch_size)


def _samples(logged: list[dict], role: str, prompts: HarnessPrompts) -> list[dict]:
    """One sample per document from the harness's per-(document, filter) records."""
    by_document: dict[int, dict[str, dict]] = {}
    for record in logged:
        by_document.setdefault(record["doc_id"], {})[record["filter"]] = record
    verdict_metric, verdict_filter = prompts.verdict_metric.split(",", 1)
    samples = []
    for doc_id in sorted(by_document):
        records = by_document[doc_id]
        first = records[verdict_filter]
        value = first.get(verdict_metric)
        samples.append(
            {
                "index": doc_id,
                "model": role,
                "source": prompts.source,
                "row": doc_id + 1,
                "prompt": _text(first["arguments"][0][0]),
                "reference": _text(first["target"]),
                "reference_answer": None,
                "prediction": _text(_only(_only(first["resps"]))),
                "extracted_answer": _text(_only(first["filtered_resps"])),
                "extraction_method": verdict_filter,
                "correct": bool(value) if value in (0, 1) else None,
                "metrics": {
                    f"{metric},{name}": float(record[metric])
                    for name, record in records.items()
                    for metric in record["metrics"]
                    if _is_number(record.get(metric))
                },
            }
        )
    return samples


def _only(values: Any) -> Any:
    """The one item of a one-item list (a generation task's response), else the list (one
    log-likelihood per choice)."""
    return values[0] if isinstance(values, list | tuple) and len(values) == 1 else values


def _text(value: Any) -> str:
    return value if isinstance(value, str) else re.sub(r"\s+", " ", repr(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
