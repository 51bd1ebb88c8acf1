"""Names shared by several layers of megasft, kept free of imports so that any layer may use them.

The files of a megasft megatron checkpoint directory are described in
`megasft.checkpoint.layout` (and docs/convert.md); their names live here because the model
loader (`megasft.megatron`), the converter and the trainer all read them.
"""

ARCHITECTURE_FILE = "architecture.json"
"""`megasft.megatron.architecture.ModelArchitecture` as JSON, in every megatron checkpoint."""
HF_FILES_DIR = "hf"
"""The source Hugging Face model's config, generation config and tokenizer, in a checkpoint."""
HF_CONFIG_FILE = "config.json"
"""A Hugging Face model directory's configuration."""
