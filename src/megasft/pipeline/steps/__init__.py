"""What each pipeline step does: the one call each KFP component makes into megasft.

A step takes its configuration sections (plain dicts, as the pipeline passes them) and its KFP
artifacts (used only through `.path`, `.metadata` and `.log_metric`, so the tests pass plain
stand-ins), and does its stage's work with the stage's own public function. See
docs/pipeline.md.
"""

from megasft.pipeline.steps.common import PIPELINE_NAME, ArtifactLike, experiment_name
from megasft.pipeline.steps.inputs import (
    checkpoint_convert,
    dataset_figures,
    record_inputs,
    tokenize_and_mask,
    validate,
)
from megasft.pipeline.steps.outcome import evaluate, finish, post_json, register
from megasft.pipeline.steps.training import train, train_figures, training_settings

__all__ = [
    "PIPELINE_NAME",
    "ArtifactLike",
    "checkpoint_convert",
    "dataset_figures",
    "evaluate",
    "experiment_name",
    "finish",
    "post_json",
    "record_inputs",
    "register",
    "tokenize_and_mask",
    "train",
    "train_figures",
    "training_settings",
    "validate",
]
