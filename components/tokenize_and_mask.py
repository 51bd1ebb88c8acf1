"""tokenize-and-mask: chat/instruction data -> token ids and assistant-only loss masks, packed."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tokenize_and_mask(
    data: dict,
    model: dict,
    data_digest: str,
    dataset: Output[Dataset],
    preview: Output[HTML],
    metrics: Output[Metrics],
):
    """`megasft prepare` of the `data` section with the base model's tokenizer. `data_digest`
    (the raw data's sha256) is not read here: it makes KFP's cache key follow the content of
    the data, not just its path."""
    from megasft.pipeline import steps

    steps.tokenize_and_mask(data, model, dataset=dataset, preview=preview, metrics=metrics)
