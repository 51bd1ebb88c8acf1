"""Greedy generation through vLLM (`--engine vllm`), on GPU images that have it installed.

vLLM loads the model itself, from the Hugging Face directory the stage loaded (a megatron
checkpoint's converted copy), so the transformers copy leaves the GPU first: vLLM claims most
of the device's memory for its weights and KV cache. Prompts go in as the token ids megasft
rendered with the chat template, exactly as for the transformers engine; decoding is greedy
(temperature 0) with the same stop tokens and `--max-new-tokens`. vLLM batches continuously,
so `--batch-size` does not apply. The CPU tests never import vLLM; the GPU-marked tests in
tests/evaluate/test_vllm_engine.py compare it with the transformers engine.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

import torch

from megasft.evaluate.generate import Generation, GenerationRun, GenerationSettings, cut_at_stop
from megasft.evaluate.model import LoadedModel, free


def generate_greedy_vllm(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seed: int
) -> GenerationRun:
    """Greedy answers to `prompts` by vLLM, from the model directory `loaded` came from.

    Args:
        loaded: the model as the stage loaded it; its transformers weights are dropped (the
            validation loss, which needs them, has been computed by then).
        prompts: token ids, at least one each.
        settings: `max_new_tokens`, `stop_token_ids` and `progress` apply.
        seed: vLLM's seed (greedy decoding draws nothing, but it is recorded).

    Returns:
        The answers in the order of the prompts, cut at the first stop token.

    Raises:
        ValueError: when `loaded` does not say which directory it came from, or a prompt is
            empty.
    """
    from vllm import LLM, SamplingParams

    if loaded.hf_path is None:
        raise ValueError("the vLLM engine needs the model's Hugging Face directory")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    free(loaded)
    engine = LLM(
        model=str(loaded.hf_path),
        tokenizer=str(loaded.chat_tokenizer.path),
        dtype=loaded.description["dtype"],
        seed=seed,
    )
    sampling = SamplingParams(
        temperature=0.0,
        max_tokens=settings.max_new_tokens,
        stop_token_ids=list(settings.stop_token_ids),
    )
    started = time.perf_counter()
    try:
        outputs = engine.generate(
            [{"prompt_token_ids": list(prompt)} for prompt in prompts],
            sampling,
            use_tqdm=settings.progress,
        )
        seconds = time.perf_counter() - started
    finally:
        del engine
        _release_gpu()
    generations: list[Generation] = []
    generated_tokens = 0
    for output in outputs:
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        generation, produced = cut_at_stop(token_ids, settings.stop_token_ids)
        if not generation.stopped and completion.finish_reason == "stop":
            # vLLM left the stop token out of token_ids: the answer is whole and it stopped.
            generation, produced = Generation(tuple(token_ids), True), len(token_ids) + 1
        generations.append(generation)
        generated_tokens += produced
    return GenerationRun(generations, seconds, generated_tokens)


def _release_gpu() -> None:
    """Frees a dropped engine's GPU memory before the next model is loaded; vLLM keeps some of
    it (its distributed state) until told, and how to tell it differs between versions."""
    try:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
    except ImportError:
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
