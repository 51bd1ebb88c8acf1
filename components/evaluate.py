"""evaluate: validation loss and generation-based task metrics, tuned vs base, and the gate."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    evaluate: dict,
    model: dict,
    tracking: dict,
    parent_run_id: str,
    tuned: Input[Model],
    dataset: Input[Dataset],
    checkpoints: Input[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    """`megasft evaluate` of the tuned HF model against the base on the `evaluate` section's
    prompts; returns whether the gate passed, which decides registration."""
    from megasft.pipeline import steps

    return steps.evaluate(
        evaluate,
        model,
        tracking,
        parent_run_id=parent_run_id,
        tuned=tuned,
        dataset=dataset,
        checkpoints=checkpoints,
        metrics=metrics,
        report=report,
    )
