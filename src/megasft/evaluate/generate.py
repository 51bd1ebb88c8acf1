"""Batched greedy generation with a KV cache, stopping at the end-of-turn token.

Prompts are sorted by length (longest first, so that a batch too big for memory fails at
once) and cut into batches, each left-padded to its longest prompt: generation appends on the
right, so every row's next token lands in the same column. The attention mask hides the
padding and transformers derives position ids from it (`cumsum(mask) - 1`), so a padded row
computes what it would alone; on a float32 model, batched and one-by-one outputs are
identical (a test holds this). Outputs are put back in the order of the prompts.

Decoding uses a fresh `GenerationConfig` rather than the model's `generation_config.json`,
whose sampling settings or repetition penalties would change greedy decoding.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    """Most tokens generated per prompt, the end-of-turn token included."""
    stop_token_ids: tuple[int, ...]
    """Generation of a row ends at the first of these (end-of-turn, EOS)."""
    pad_token_id: int
    """Fills the left of short prompts and the right of rows that stopped early."""
    batch_size: int = 8
    """Prompts generated together."""
    progress: bool = False
    """Show a progress bar (on stderr)."""
    description: str = "generate"
    """The progress bar's label."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token")


@dataclass(frozen=True, slots=True)
class Generation:
    token_ids: tuple[int, ...]
    """The generated answer, without the stop token and without padding."""
    stopped: bool
    """True when the answer ended with a stop token, False when it hit max_new_tokens."""


@dataclass(frozen=True)
class GenerationRun:
    generations: list[Generation]
    """One per prompt, in the order of the prompts."""
    seconds: float
    generated_tokens: int
    """Tokens the model produced, stop tokens included (what tokens/s counts)."""

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def generate_greedy(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], settings: GenerationSettings
) -> GenerationRun:
    """Greedy answers to `prompts` (lists of token ids, at least one token each)."""
    from transformers import GenerationConfig

    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(settings.stop_token_ids),
        pad_token_id=settings.pad_token_id,
        use_cache=True,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    results: list[Generation | None] = [None] * len(prompts)
    generated_tokens = 0
    progress = tqdm(
        total=len(prompts),
        unit=" prompts",
        desc=settings.description,
        file=sys.stderr,
        disable=not settings.progress,
    )
    started = time.perf_counter()
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        width = len(prompts[batch[0]])  # longest first
        input_ids = torch.full((len(batch), width), settings.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            prompt = prompts[index]
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
        for row, index in enumerate(batch):
            generation, produced = cut_at_stop(
                output[row, width:].tolist(), settings.stop_token_ids
            )
            results[index] = generation
            generated_tokens += produced
        progress.update(len(batch))
    seconds = time.perf_counter() - started
    progress.close()
    return GenerationRun(results, seconds, generated_tokens)


def cut_at_stop(tokens: list[int], stop_ids: tuple[int, ...]) -> tuple[Generation, int]:
    """The answer up to the first stop token, and how many tokens the model produced for it.

    Args:
        tokens: a generated row (after a stop token, the rest is padding).
        stop_ids: the ids that end an answer.

    Returns:
        The answer (without the stop token) and the count of tokens produced, the stop
        token included.
    """
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return Generation(tuple(tokens[:position]), True), position + 1
    return Generation(tuple(tokens), False), len(tokens)
