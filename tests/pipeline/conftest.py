from __future__ import annotations

import dataclasses

import pytest

from megasft.demo.__main__ import build_inputs
from megasft.pipeline.config import PipelineConfig, load_pipeline_config


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory):
    """The demo's inputs at test size: problems, a tiny tokenizer and a tiny random Llama."""
    return build_inputs(tmp_path_factory.mktemp("inputs"), train_problems=200, test_problems=16)


@pytest.fixture
def tiny_config(demo_inputs) -> PipelineConfig:
    """The demo configuration on the test-size inputs: 4 training steps, no tracking."""
    config = load_pipeline_config("demo")
    return dataclasses.replace(
        config,
        data={**config.data, "path": str(demo_inputs["train"])},
        model={**config.model, "path": str(demo_inputs["model"])},
        train={
            **config.train,
            "train_iters": 4,
            "warmup_iters": 1,
            "eval_interval": 2,
            "save_interval": 2,
        },
        evaluate={**config.evaluate, "data": str(demo_inputs["test"]), "max_new_tokens": 16},
        tracking={},
    )
