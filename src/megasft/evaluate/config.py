"""The evaluation stage's settings: `EvaluateConfig`, one frozen dataclass.

Each field is declared with `megasft.settings.setting`, which gives `megasft evaluate` its
flags (docs/cli.md). This module imports no torch, so that building the CLI stays quick;
`megasft.evaluate.stage.evaluate` runs the stage.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from megasft.data.formats import FORMATS, parse_column_map
from megasft.errors import ConfigError
from megasft.evaluate.metrics import check_gate_is_computable, known_gate_metrics, parse_gate
from megasft.evaluate.tasks import get_task
from megasft.settings import raise_problems, setting, setting_problems

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
"""megasft.evaluate.model.DTYPES, spelled out here so that this module does not import torch."""
ENGINES = ("transformers", "vllm")
"""How answers are generated: `generate.py` (transformers) or `vllm_engine.py`."""


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = setting(
        help="The model to evaluate: a Hugging Face directory or a megatron checkpoint.",
        metavar="DIR",
    )
    data: str = setting(
        help="Prompts with references: a data file in any `prepare` input format. Or a "
        "`prepare` output directory: then only the validation loss is computed (no generation).",
        metavar="FILE_OR_DATA_DIR",
    )
    output: str = setting(
        help="The output directory (metrics.json, samples.jsonl, report.html).", metavar="DIR"
    )
    # No `choices`: besides the registered names, a family takes any `PREFIX:NAME`
    # (`lm-eval:gsm8k`); `get_task` checks the name and lists what there is.
    task: str = setting(
        "exact-match",
        "How answers are scored: a task of megasft.evaluate.tasks (exact-match, format, gsm8k), "
        "or lm-eval:TASK, an lm-evaluation-harness task run offline on --data.",
        metavar="TASK",
    )
    baseline: str | None = setting(
        None,
        "The base model to compare with (HF directory or megatron checkpoint).",
        metavar="DIR",
    )
    max_new_tokens: int = setting(
        512,
        "Longest answer in tokens, the end-of-turn token included.",
        metavar="N",
        at_least=1,
    )
    val_data: str | None = setting(
        None,
        "A `prepare` output directory: compute the validation loss and perplexity on it, "
        "beside generation.",
        metavar="DIR",
    )
    val_split: str = setting(
        "val",
        "Which split of the validation data the loss is computed on.",
        choices=("val", "train"),
    )
    tokenizer: str | None = setting(
        None, "Tokenizer directory for the model, instead of the model's own.", metavar="DIR"
    )
    convert_base: str | None = setting(
        None,
        "For a megatron model: the HF model it came from, whose config and tokenizer go with "
        "the converted weights (`convert --base`); by default the copies the checkpoint carries.",
        metavar="DIR",
    )
    base: str | None = setting(
        None,
        "For a LoRA model (a Hugging Face PEFT adapter directory, or a LoRA run's "
        "checkpoint): the Hugging Face base model the adapters apply to.",
        metavar="DIR",
    )
    format: str = setting(
        "auto", "The data file's format; auto detects it.", choices=("auto", *FORMATS)
    )
    column_map: tuple[tuple[str, str], ...] = setting(
        (),
        "Read a format's field from another column, like `prepare --map`: FIELD=COLUMN,... "
        "e.g. prompt=question,response=answer.",
        flag="--map",
        metavar="FIELD=COLUMN,...",
        parse=lambda text: tuple(parse_column_map(text).items()),
    )
    system_prompt: str | None = setting(
        None,
        "System message for prompts that have none (use the one training used).",
        metavar="TEXT",
    )
    reference_field: str | None = setting(
        None,
        "Take the reference from this column instead of the final assistant turn.",
        metavar="COLUMN",
    )
    format_pattern: str | None = setting(
        None,
        "A well-formed answer matches this regex (re.search); each task has a default; "
        "--task format needs one.",
        metavar="REGEX",
    )
    gate: str | None = setting(
        None,
        "Pass/fail conditions METRIC OP NUMBER, comma-separated, e.g. "
        "accuracy>=0.5,delta_accuracy_ci_low>0; metrics: "
        + ", ".join(known_gate_metrics())
        + ", and an lm-eval task's own METRIC,FILTER (e.g. exact_match,strict-match).",
        metavar="CONDITIONS",
    )
    limit: int | None = setting(None, "Evaluate the first N prompts only.", metavar="N", at_least=1)
    batch_size: int = setting(8, "Prompts generated together.", metavar="N", at_least=1)
    val_batch_tokens: int = setting(
        4096,
        "Token budget of one validation forward pass (documents x longest length).",
        metavar="N",
        at_least=1,
    )
    seed: int = setting(
        0,
        "Seeds torch before each model's generation (greedy decoding draws nothing, but a "
        "model's custom code might).",
        metavar="S",
    )
    device: str = setting(
        "auto", "auto (an accelerator if present, else CPU), cpu, cuda or cuda:N.", metavar="DEVICE"
    )
    dtype: str = setting(
        "auto",
        "auto: bfloat16 on an accelerator, float32 on CPU.",
        choices=("auto", *DTYPE_CHOICES),
    )
    engine: str = setting(
        "transformers",
        "How answers are generated, greedily: transformers (CPU or GPU), or vllm where vLLM is "
        "installed (a GPU image).",
        choices=ENGINES,
    )
    num_fewshot: int | None = setting(
        None,
        "For lm-eval tasks: worked examples before each question, instead of the task's own "
        "number (5 for gsm8k).",
        metavar="N",
        at_least=0,
    )
    fewshot_data: str | None = setting(
        None,
        "For lm-eval tasks: a local data file the worked examples are drawn from (for gsm8k, "
        "its train split); without it they come from --data, never the question asked.",
        metavar="FILE",
    )
    chatml_fallback: bool = setting(
        False, "Evaluate a tokenizer without a chat template with ChatML (as prepare does)."
    )
    training_log: str | None = setting(
        None,
        "JSON Lines with step and loss per line (the trainer's metrics.jsonl), drawn in the "
        "report.",
        metavar="FILE",
    )
    overwrite: bool = setting(False, "Replace the output directory if it exists.")
    progress: bool = setting(True, "Progress bars on stderr.", aliases={"--quiet": False})

    def __post_init__(self) -> None:
        problems = setting_problems(self)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            problems.append(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        try:
            task = get_task(self.task)
        except ConfigError as error:
            task = None
            problems.append(str(error))
        if task is not None:
            if task.default_format_pattern is None and not self.format_pattern:
                problems.append(f"--task {task.name} scores answers by --format-pattern; give one")
            problems += self._fewshot_problems(task)
        problems += self._engine_problems()
        try:
            re.compile(self.format_pattern or "")
        except re.error as error:
            problems.append(
                f"--format-pattern {self.format_pattern!r} is not a valid regex: {error}"
            )
        if self.data_is_prepared and self.val_data:
            problems.append(
                f"--data {self.data} is a prepared dataset, which is used for the validation "
                "loss; give either that or --val-data, not both"
            )
        if self.gate:
            try:
                check_gate_is_computable(
                    parse_gate(self.gate),
                    has_baseline=self.baseline is not None,
                    has_generation=not self.data_is_prepared,
                    has_val=self.val_directory is not None,
                    task=task,
                )
            except ConfigError as error:
                problems.append(str(error))
        raise_problems(problems)

    def _engine_problems(self) -> list[str]:
        if self.engine != "vllm":
            return []
        if importlib.util.find_spec("vllm") is None:
            return [
                "--engine vllm: vLLM is not installed here; use an image with vLLM (a GPU "
                "image) or --engine transformers"
            ]
        if self.device == "cpu":
            return ["--engine vllm runs on a GPU; use --engine transformers on CPU"]
        return []

    def _fewshot_problems(self, task) -> list[str]:
        given = [
            flag
            for flag, value in (
                ("--num-fewshot", self.num_fewshot),
                ("--fewshot-data", self.fewshot_data),
            )
            if value is not None
        ]
        if given and not task.takes_fewshot:
            return [
                f"{' and '.join(given)} apply to lm-eval tasks; --task {task.name} poses the "
                "data file's own prompts"
            ]
        if self.fewshot_data is not None and not Path(self.fewshot_data).is_file():
            return [f"--fewshot-data {self.fewshot_data}: no such file"]
        return []

    @property
    def data_is_prepared(self) -> bool:
        """True when --data is a `prepare` output directory (val loss only)."""
        return Path(self.data).is_dir()

    @property
    def val_directory(self) -> str | None:
        return self.data if self.data_is_prepared else self.val_data

    @property
    def resolved_format_pattern(self) -> str:
        return self.format_pattern or get_task(self.task).default_format_pattern or ""
