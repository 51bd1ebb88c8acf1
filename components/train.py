"""train: SFT on megatron-core, with torchrun in the step or as a Kubeflow TrainJob or PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train(
    config_name: str,
    train: dict,
    launcher: dict,
    tracking: dict,
    kfp_run_id: str,
    parent_run_id: str,
    dataset: Input[Dataset],
    base_checkpoint: Input[Model],
    checkpoints: Output[Model],
    metrics: Output[Metrics],
):
    """`megasft train` of the `train` section from the converted base checkpoint. With
    `launcher.kind: trainjob` (or `pytorchjob`) this step only launches and watches the job on
    the GPU nodes (streaming its first node's log here); a retried step resumes from the newest
    checkpoint on the workspace volume."""
    from megasft.pipeline import steps

    steps.train(
        train,
        launcher,
        tracking,
        config_name=config_name,
        kfp_run_id=kfp_run_id,
        parent_run_id=parent_run_id,
        dataset=dataset,
        base_checkpoint=base_checkpoint,
        checkpoints=checkpoints,
        metrics=metrics,
    )
