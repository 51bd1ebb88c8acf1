"""One model's greedy answers to a task's prompts, scored: the samples and their metrics.

Each prompt is rendered with the model's chat template, answered by `generate.generate_greedy`
and scored by the task; a sample (a line of samples.jsonl, docs/evaluate.md) records all of it.
"""

from __future__ import annotations

import re

import torch

from megasft.evaluate.generate import GenerationSettings, generate_greedy
from megasft.evaluate.metrics import generation_metrics
from megasft.evaluate.model import LoadedModel
from megasft.evaluate.prompts import TaskPrompts, render_prompt
from megasft.evaluate.tasks import Task


def answer_prompts(
    loaded: LoadedModel,
    role: str,
    task: Task,
    prompts: TaskPrompts,
    format_pattern: str,
    settings: GenerationSettings,
    seed: int,
    warnings: list[str],
) -> tuple[dict, list[dict]]:
    """Generates `loaded`'s answers to `prompts` and scores them by `task`.

    Args:
        loaded: the model and its tokenizer.
        role: "tuned" or "base", as samples and warnings name the model.
        task: scores each answer.
        prompts: the examples with their reference answers.
        format_pattern: what a well-formed answer matches (`re.search`).
        settings: how to generate (its stop and pad ids are the model's).
        seed: seeds torch before generating.
        warnings: gets a line when prompts plus answers may not fit the model's context.

    Returns:
        The generation metrics (`metrics.generation_metrics`, timings) and one sample per
        prompt, in data order.
    """
    rendered = [render_prompt(loaded.chat_tokenizer, example) for example in prompts.examples]
    context = loaded.description.get("max_position_embeddings")
    longest = settings.max_new_tokens
    too_long = sum(len(ids) + longest > context for _, ids in rendered) if context else 0
    if too_long:
        warnings.append(
            f"{too_long} prompt(s) plus --max-new-tokens {longest} run past the "
            f"{role} model's max_position_embeddings ({context}); their answers may be garbage"
        )
    torch.manual_seed(seed)
    run = generate_greedy(loaded.model, [ids for _, ids in rendered], settings)
    pattern = re.compile(format_pattern)
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
