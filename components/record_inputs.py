"""record-inputs: the MLflow records of the two cached steps (a cached step does not run)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def record_inputs(
    tracking: dict,
    parent_run_id: str,
    data_path: str,
    data_digest: str,
    model_path: str,
    model_digest: str,
    dataset: Input[Dataset],
    base_checkpoint: Input[Model],
):
    """Nested MLflow runs for tokenize-and-mask (the dataset via mlflow.data with its source
    hash, manifest, mask preview) and checkpoint-convert, whether they ran or came from KFP's
    cache."""
    from megasft.pipeline import steps

    steps.record_inputs(
        tracking,
        parent_run_id=parent_run_id,
        data_path=data_path,
        data_digest=data_digest,
        model_path=model_path,
        model_digest=model_digest,
        dataset=dataset,
        base_checkpoint=base_checkpoint,
    )
