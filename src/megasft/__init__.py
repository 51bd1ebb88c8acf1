"""megasft: supervised fine-tuning of LLMs with megatron-core, as a Kubeflow pipeline."""

__version__ = "0.1.0"
