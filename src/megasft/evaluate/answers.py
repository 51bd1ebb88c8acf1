"""One model's greedy answers to a task's prompts, scored: the samples and their metrics.

Each prompt is rendered with the model's chat template, answered by the engine
(`generate.generate_greedy` with transformers, or `vllm_engine.generate_greedy_vllm`) and
scored by the task; a sample (a line of samples.jsonl, docs/evaluate.md) records all of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from megasft.evaluate.generate import GenerationRun, GenerationSettings, generate_greedy
from megasft.evaluate.metrics import generation_metrics
from megasft.evaluate.model import LoadedModel
from megasft.evaluate.prompts import TaskPrompts, render_prompt
from megasft.evaluate.tasks import Task

if TYPE_CHECKING:
    from megasft.evaluate.config import EvaluateConfig


def answer_prompts(
    loaded: LoadedModel,
    role: str,
    task: Task,
    prompts: TaskPrompts,
    config: EvaluateConfig,
    warnings: list[str],
) -> tuple[dict, list[dict]]:
    """Generates `loaded`'s answers to `prompts` and scores them by `task`.

    Args:
        loaded: the model and its tokenizer.
        role: "tuned" or "base", as samples and warnings name the model.
        task: scores each answer.
        prompts: the examples with their reference answers.
        config: the stage's settings: `engine`, `max_new_tokens`, `batch_size`, `seed`,
            `progress` and the format pattern.
        warnings: gets a line when prompts plus answers may not fit the model's context.

    Returns:
        The generation metrics (`metrics.generation_metrics`, timings) and one sample per
        prompt, in data order.
    """
    settings = GenerationSettings(
        max_new_tokens=config.max_new_tokens,
        stop_token_ids=loaded.stop_token_ids,
        pad_token_id=loaded.pad_token_id,
        batch_size=config.batch_size,
        progress=config.progress,
        description=f"generate ({role})",
    )
    rendered = [render_prompt(loaded.chat_tokenizer, example) for example in prompts.examples]
    context = loaded.description.get("max_position_embeddings")
    longest = settings.max_new_tokens
    too_long = sum(len(ids) + longest > context for _, ids in rendered) if context else 0
    if too_long:
        warnings.append(
            f"{too_long} prompt(s) plus --max-new-tokens {longest} run past the "
            f"{role} model's max_position_embeddings ({context}); their answers may be garbage"
        )
    run = _generate(loaded, [ids for _, ids in rendered], settings, config)
    pattern = re.compile(config.resolved_format_pattern)
    decode = loaded.chat_tokenizer.tokenizer.decode
    samples = []
    for index, (example, expected, (prompt_text, _), generation) in enumerate(
        zip(prompts.examples, prompts.expected, rendered, run.generations, strict=True)
    ):
        prediction = decode(list(generation.token_ids), skip_special_tokens=False)
        scored = task.score(prediction, expected, pattern)
        samples.append(
            {
                "index": index,
                "model": role,
                "source": example.source,
                "row": example.row,
                "prompt": prompt_text,
                "reference": example.reference,
                "reference_answer": expected,
                "prediction": prediction,
                "extracted_answer": scored.answer,
                "extraction_method": scored.method,
                "correct": scored.correct,
                "format_ok": scored.format_ok,
                "response_tokens": len(generation.token_ids),
                "stopped": generation.stopped,
            }
        )
    metrics = generation_metrics(
        correct=[sample["correct"] for sample in samples],
        format_ok=[sample["format_ok"] for sample in samples],
        response_tokens=[sample["response_tokens"] for sample in samples],
        stopped=[sample["stopped"] for sample in samples],
        methods=[sample["extraction_method"] for sample in samples],
        method_order=task.extraction_methods,
    )
    metrics.update(
        generation_seconds=round(run.seconds, 3),
        generated_tokens=run.generated_tokens,
        generated_tokens_per_second=round(run.tokens_per_second, 2),
    )
    return metrics, samples


def _generate(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    config: EvaluateConfig,
) -> GenerationRun:
    """Greedy answers by the configured engine."""
    if config.engine == "vllm":
        from megasft.evaluate.vllm_engine import generate_greedy_vllm

        return generate_greedy_vllm(loaded, prompts, settings, config.seed)
    torch.manual_seed(config.seed)
    return generate_greedy(loaded.model, prompts, settings)
