"""The evaluation stage: validation loss, greedy generation, task metrics, a gate and a report.

    from megasft.evaluate import EvaluateConfig, evaluate
    metrics = evaluate(EvaluateConfig(model="out/hf", data="test.jsonl", output="eval/"))

The entry point lives in `megasft.evaluate.stage` and is imported on first use, so that
building the `megasft` CLI (which imports `megasft.evaluate.cli`) does not import torch.
"""

from __future__ import annotations

import importlib

__all__ = ["EvaluateConfig", "evaluate"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("megasft.evaluate.stage"), name)
    raise AttributeError(f"module 'megasft.evaluate' has no attribute {name!r}")
