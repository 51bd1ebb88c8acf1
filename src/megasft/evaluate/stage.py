"""The evaluation stage: does the tuned model beat the base?

    evaluate(EvaluateConfig(model="tuned-hf/", data="gsm8k_test.jsonl", output="eval/",
                            task="gsm8k", baseline="base-hf/", gate="delta_accuracy>0"))

First everything that can be checked without a model (settings, prompts and references,
validation data, training log): a mistake there costs seconds, not a generation run. Then, one
model in memory at a time, the tuned and the base model: validation loss, greedy answers scored
by the task (`answers.py`). Last, deltas and the gate; metrics.json, samples.jsonl and
report.html are written to a staging directory renamed into place (docs/evaluate.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from megasft import __version__
from megasft.atomic import move_into_place
from megasft.data import read_manifest
from megasft.errors import InputError
from megasft.evaluate.config import EvaluateConfig
from megasft.evaluate.metrics import deltas, evaluate_gate, is_task_metric_name, parse_gate
from megasft.evaluate.model import (
    LoadedModel,
    check_model,
    free,
    load_model,
    resolve_device,
    resolve_dtype,
)
from megasft.evaluate.paired import PAIRED_METRICS, paired_statistics
from megasft.evaluate.report import read_training_log, write_report
from megasft.evaluate.tasks import Task, get_task
from megasft.evaluate.val_loss import open_val_split, validation_loss

__all__ = ["EvaluateConfig", "evaluate", "summarize"]

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class _Model:
    role: str
    """"tuned" or "base": the key of its metrics and samples."""
    path: str
    tokenizer: str | None
    fallback_tokenizer: str | None
    """The tokenizer to use when the model directory has none."""
    convert_base: str | None
    """For a megatron checkpoint: the HF model it came from."""


def evaluate(config: EvaluateConfig) -> dict:
    """Runs the evaluation stage.

    Args:
        config: the settings, checked on construction.

    Returns:
        The metrics, also written to `output/metrics.json` (docs/evaluate.md, Outputs).

    Raises:
        InputError, ConfigError: for data, models or settings that cannot be used, naming
            what to do; raised before any model is loaded where they can be found then.
    """
    started = time.monotonic()
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise InputError(
            f"output directory {output} already exists; pass --overwrite to replace it"
        )
    task = get_task(config.task)
    prompts = None if config.data_is_prepared else task.prepare(config)
    val_manifest = _check_val_data(config) if config.val_directory else None
    training_log = read_training_log(config.training_log) if config.training_log else None
    gate = parse_gate(config.gate) if config.gate else None
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    # --base: the HF model a LoRA adapter (or a LoRA run's checkpoint) applies to
    tuned_base = config.base or config.convert_base
    models = [_Model("tuned", config.model, config.tokenizer, None, tuned_base)]
    if config.baseline:
        # A baseline without tokenizer files borrows the tuned model's --tokenizer.
        models.append(_Model("base", config.baseline, None, config.tokenizer, None))
    # A task that poses its prompts itself needs no chat template from the tokenizer.
    chatml_fallback = config.chatml_fallback or not task.uses_chat_template
    for model in models:
        check_model(
            model.path,
            model.tokenizer,
            chatml_fallback,
            model.fallback_tokenizer,
            model.convert_base,
        )
    if not config.progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    output.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place at the end, as `prepare` does: a killed
    # run never leaves a half-written evaluation under the real name.
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    scratch = output.parent / f".{output.name}.convert-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        warnings: list[str] = []
        results, descriptions, samples, templates = {}, {}, [], {}
        for model in models:
            role = model.role
            loaded = load_model(
                model.path,
                model.tokenizer,
                device,
                dtype,
                chatml_fallback,
                scratch / role,
                convert_base=model.convert_base,
                fallback_tokenizer=model.fallback_tokenizer,
            )
            descriptions[role] = loaded.description
            templates[role] = loaded.chat_tokenizer.template.sha256
            results[role], role_samples = _evaluate_model(
                loaded, role, config, task, prompts, val_manifest, warnings
            )
            samples += role_samples
            free(loaded)
        different_templates = templates.get("base", templates["tuned"]) != templates["tuned"]
        if prompts and task.uses_chat_template and different_templates:
            warnings.append(
                "the base model's chat template differs from the tuned model's, so each was "
                "prompted in its own format"
            )
        paired = _paired(samples, warnings) if config.baseline and prompts else None
        metrics = _metrics(config, results, paired, descriptions, prompts, gate, warnings, started)
        _write_samples(staging / SAMPLES_FILE, samples)
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        write_report(staging / REPORT_FILE, metrics, samples, training_log)
        move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return metrics


def _check_val_data(config: EvaluateConfig) -> dict:
    """The prepared dataset's manifest, after checking that its split has rows."""
    manifest = read_manifest(config.val_directory)
    open_val_split(config.val_directory, config.val_split)
    return manifest


def _evaluate_model(
    loaded: LoadedModel,
    role: str,
    config: EvaluateConfig,
    task: Task,
    prompts: Any,
    val_manifest: dict | None,
    warnings: list[str],
) -> tuple[dict, list[dict]]:
    """One model's metrics and samples: its validation loss, its scored answers."""
    result: dict = {}
    if val_manifest is not None:
        result.update(_validation_loss(loaded, role, config, val_manifest, warnings))
    if prompts is None:
        return result, []
    answered, samples = task.answer(loaded, role, prompts, config, warnings)
    result.update(answered)
    return result, samples


def _paired(samples: list[dict], warnings: list[str]) -> dict | None:
    """The paired statistics of the two models' verdicts, prompt by prompt (`paired.py`); None
    when the task gives no right-or-wrong verdict per prompt."""
    verdicts: dict[str, dict[int, bool | None]] = {"tuned": {}, "base": {}}
    for sample in samples:
        verdicts[sample["model"]][sample["index"]] = sample.get("correct")
    indices = sorted(verdicts["tuned"])
    if sorted(verdicts["base"]) != indices:
        raise RuntimeError("the tuned and the base model answered different prompts")
    tuned = [verdicts["tuned"][index] for index in indices]
    base = [verdicts["base"][index] for index in indices]
    if any(verdict is None for verdict in tuned + base):
        warnings.append(
            "the task gives no right-or-wrong verdict per prompt, so there are no paired "
            f"statistics ({', '.join(PAIRED_METRICS)})"
        )
        return None
    return paired_statistics(tuned, base)


def _validation_loss(
    loaded: LoadedModel, role: str, config: EvaluateConfig, manifest: dict, warnings: list[str]
) -> dict:
    """The model's validation loss and perplexity (None where they are not finite)."""
    _check_tokenizer_matches(loaded, role, manifest, config, warnings)
    loss = validation_loss(
        loaded.model,
        config.val_directory,
        split=config.val_split,
        batch_tokens=config.val_batch_tokens,
        progress=config.progress,
        description=f"val loss ({role})",
    )
    if not math.isfinite(loss.loss):
        warnings.append(
            f"the {role} model's validation loss is {loss.loss} (its logits overflow in "
            f"{loaded.description['dtype']}?); try --dtype float32"
        )
    return {
        "val_loss": loss.loss if math.isfinite(loss.loss) else None,
        "perplexity": loss.perplexity if math.isfinite(loss.perplexity) else None,
        "val_target_tokens": loss.target_tokens,
        "val_documents": loss.documents,
    }


def _check_tokenizer_matches(
    loaded: LoadedModel, role: str, manifest: dict, config: EvaluateConfig, warnings: list[str]
) -> None:
    """The validation data must have been tokenized for this model's vocabulary."""
    tokenizer = manifest.get("tokenizer", {})
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    if tokenizer.get("vocab_size", 0) > rows:
        raise InputError(
            f"{config.val_directory} was tokenized with a {tokenizer['vocab_size']}-token "
            f"vocabulary, more than the {role} model's {rows} embeddings: prepare it with this "
            "model's tokenizer"
        )
    if tokenizer.get("sha256") != loaded.chat_tokenizer.sha256:
        warnings.append(
            f"{config.val_directory} was prepared with the tokenizer in {tokenizer.get('path')}, "
            f"whose files differ from the {role} model's ({loaded.chat_tokenizer.path}); its "
            "validation loss is only meaningful if the vocabularies agree"
        )


def _metrics(
    config: EvaluateConfig,
    results: dict,
    paired: dict | None,
    descriptions: dict,
    prompts: Any,
    gate,
    warnings: list[str],
    started: float,
) -> dict:
    tuned, base = results["tuned"], results.get("base")
    differences = deltas(tuned, base) if base is not None else None
    # The flat view: what the gate reads and what a tracker logs as scalars.
    summary = {key: value for key, value in tuned.items() if isinstance(value, int | float)}
    if base is not None:
        summary.update(
            {f"base_{key}": value for key, value in base.items() if isinstance(value, int | float)}
        )
        summary.update(differences)
    if paired is not None:
        summary.update({name: paired[name] for name in PAIRED_METRICS})
    verdict = evaluate_gate(gate, summary) if gate else None
    return {
        "format_version": 1,
        "created_by": f"megasft {__version__}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": config.task,
        "model": descriptions["tuned"],
        "baseline": descriptions.get("base"),
        "data": {
            "prompts": None if config.data_is_prepared else config.data,
            "examples": len(prompts.examples) if prompts else None,
            "val_data": config.val_directory,
            "val_split": config.val_split if config.val_directory else None,
        },
        "settings": {
            "max_new_tokens": config.max_new_tokens,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "format": config.format,
            "column_map": dict(config.column_map),
            "system_prompt": config.system_prompt,
            "reference_field": config.reference_field,
            "format_pattern": config.resolved_format_pattern,
            "limit": config.limit,
            "gate": config.gate,
            "engine": config.engine,
            "num_fewshot": config.num_fewshot,
            "fewshot_data": config.fewshot_data,
        },
        "tuned": tuned,
        "base": base,
        "deltas": differences,
        "paired": paired,
        "summary": summary,
        "gate": verdict,
        "warnings": warnings,
        "seconds": round(time.monotonic() - started, 3),
    }


def _write_samples(path: Path, samples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for sample in samples:
            file.write(json.dumps(sample, ensure_ascii=False) + "\n")


def summarize(metrics: dict, output: Path) -> str:
    """A few lines for the terminal: the metrics side by side and the gate verdict.

    Args:
        metrics: what `evaluate` returned.
        output: the output directory, whose report the last line names.

    Returns:
        The lines, joined.
    """
    tuned, base, difference = metrics["tuned"], metrics["base"], metrics["deltas"] or {}
    lines = [f"evaluated {metrics['model']['path']} ({metrics['task']}) -> {output}"]
    shown = ("accuracy", "format_accuracy", "mean_response_tokens", "val_loss", "perplexity")
    names = [*shown, *(name for name in tuned if is_task_metric_name(name))]
    width = max(21, *(len(name) for name in names))
    for metric in names:
        if not isinstance(tuned.get(metric), int | float):
            continue
        line = f"  {metric:{width}s} {tuned[metric]:10.4f}"
        if f"delta_{metric}" in difference:
            line += f"   base {base[metric]:10.4f}   delta {difference[f'delta_{metric}']:+.4f}"
        lines.append(line)
    paired = metrics.get("paired")
    if paired is not None:
        lines.append(
            f"  {'delta_accuracy 95% CI':{width}s} [{paired['delta_accuracy_ci_low']:+.4f}, "
            f"{paired['delta_accuracy_ci_high']:+.4f}]   McNemar p {paired['mcnemar_p']:.4g}"
        )
    for warning in metrics["warnings"]:
        lines.append(f"  warning: {warning}")
    if metrics["gate"] is not None:
        lines.append(f"  gate {metrics['gate']['reason']}")
    lines.append(f"  report: {output / REPORT_FILE}")
    return "\n".join(lines)
