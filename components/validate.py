"""validate: the run configuration against its inputs, before any heavy work; opens MLflow."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate(
    config_name: str,
    data: dict,
    model: dict,
    train: dict,
    launcher: dict,
    evaluate: dict,
    tracking: dict,
    notify: dict,
    kfp_run_id: str,
    plan: Output[Markdown],
) -> NamedTuple(
    "Outputs",
    [
        ("parent_run_id", str),
        ("data_digest", str),
        ("model_digest", str),
        ("data_path", str),
        ("base_model_path", str),
    ],
):
    """Fails on a bad configuration (unknown model family, TP not dividing the heads, missing
    data) with the setting named; returns the MLflow parent run, the inputs' content hashes
    (which key the cache of the steps that read them) and the data's and base model's paths."""
    from megasft.pipeline import steps

    sections = dict(
        config_name=config_name,
        data=data,
        model=model,
        train=train,
        launcher=launcher,
        evaluate=evaluate,
        tracking=tracking,
        notify=notify,
    )
    return steps.validate(sections, kfp_run_id=kfp_run_id, plan=plan)
