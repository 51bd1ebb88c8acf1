"""checkpoint-convert: Hugging Face <-> megatron-core distributed checkpoints, either direction."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def checkpoint_convert(
    direction: str,
    output: Output[Model],
    source: Input[Model] = None,
    source_path: str = "",
    base_path: str = "",
    content_digest: str = "",
    tracking: dict = None,
    parent_run_id: str = "",
):
    """`megasft convert`: direction hf-to-megatron (the base model at `source_path`, cached by
    its `content_digest`) or megatron-to-hf (a training output as `source`, with the config
    and tokenizer of the HF model at `base_path`)."""
    from megasft.pipeline import steps

    steps.checkpoint_convert(
        direction,
        source=source.path if source is not None else source_path,
        output=output,
        base=base_path or None,
        tracking_section=tracking,
        parent_run_id=parent_run_id,
    )
