"""register: the tuned model into the MLflow Model Registry, with an alias (gate passed only)."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    config_name: str,
    tracking: dict,
    parent_run_id: str,
    tuned: Input[Model],
    record: Output[Markdown],
) -> str:
    """Logs the tuned HF model to MLflow and registers it under `tracking.registered_model`
    with `tracking.alias`; returns the model version."""
    from megasft.pipeline import steps

    return steps.register(
        tracking, config_name=config_name, parent_run_id=parent_run_id, tuned=tuned, record=record
    )
