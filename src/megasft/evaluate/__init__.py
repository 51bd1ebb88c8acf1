"""The evaluation stage: validation loss, greedy generation, task metrics, a gate and a report.

    from megasft.evaluate import EvaluateConfig, evaluate
    metrics = evaluate(EvaluateConfig(model="out/hf", data="test.jsonl", output="eval/"))

The settings live in `megasft.evaluate.config`, the entry point in `megasft.evaluate.stage`;
both are imported on first use, so that building the `megasft` CLI does not import torch.
"""

from __future__ import annotations

import importlib

__all__ = ["EvaluateConfig", "evaluate"]


_HOMES = {"EvaluateConfig": "megasft.evaluate.config", "evaluate": "megasft.evaluate.stage"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'megasft.evaluate' has no attribute {name!r}")
