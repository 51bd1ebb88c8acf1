"""Every shipped recipe fits by its own plan, and its header carries the plan's figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from megasft.plan.cli import plan_run
from megasft.plan.report import recipe_comment
from megasft.train.config import build_config
from tests.conftest import REPO
from tests.plan.known_models import (
    DEMO_TINY_LLAMA,
    LLAMA2_7B,
    LLAMA31_8B,
    LLAMA31_70B,
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    architecture,
)

RECIPES = {
    # recipe: (the model it is for, its rows' length, where it runs)
    "llama2-7b-sft-mi300x.yaml": (LLAMA2_7B, 4096, dict(device="mi300x")),
    "llama3.1-70b-sft-mi300x.yaml": (LLAMA31_70B, 4096, dict(device="mi300x")),
    "llama3.1-8b-lora-mi300x.yaml": (LLAMA31_8B, 4096, dict(device="mi300x")),
    "llama3.1-70b-lora-mi300x.yaml": (LLAMA31_70B, 4096, dict(device="mi300x")),
    "qwen3-30b-a3b-sft-mi300x.yaml": (QWEN3_30B_A3B, 4096, dict(device="mi300x")),
    "mixtral-8x7b-sft-mi300x.yaml": (MIXTRAL_8X7B, 4096, dict(device="mi300x")),
    "tiny-cpu.yaml": (
        DEMO_TINY_LLAMA,
        512,
        dict(device="cpu", device_memory_gib=4, accelerator=False),
    ),
}


def test_every_recipe_is_planned_here():
    shipped = sorted(path.name for path in (REPO / "recipes").glob("*.yaml"))
    assert shipped == sorted(RECIPES), "add the new recipe's model, length and device to RECIPES"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fits_by_its_own_plan_and_says_so(name):
    model, seq_length, where = RECIPES[name]
    path = REPO / "recipes" / name
    config = build_config(path, data=".", load=".", save=".")
    plan = plan_run(config, architecture(model), seq_length, **where)
    assert plan.fits
    header = Path(path).read_text()
    for line in recipe_comment(plan):
        assert f"#   {line}\n" in header, f"{name}: update its header to `megasft plan`'s figures"


PIPELINE_CONFIGS = {
    # a shipped pipeline configuration whose train section names its GPU: the model it is for
    "llama2-7b-mi300x": LLAMA2_7B,
}


def test_pipeline_configs_that_name_their_gpu_fit_as_validate_plans_them():
    from megasft.pipeline.config import config_directory, load_pipeline_config, memory_plan

    named = sorted(
        path.stem
        for path in config_directory().glob("*.yaml")
        if memory_plan(load_pipeline_config(path), LLAMA2_7B) is not None
    )
    assert named == sorted(PIPELINE_CONFIGS)
    for name, model in PIPELINE_CONFIGS.items():
        plan = memory_plan(load_pipeline_config(name), model)
        assert plan.fits and plan.layout.world_size == 8
