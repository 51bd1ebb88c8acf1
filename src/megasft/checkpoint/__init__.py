"""The checkpoint-convert stage: Hugging Face <-> megatron-core `dist_checkpointing`.

`convert.convert()` is the entry point (`megasft convert` on the command line). The weight
names are data, one table per family, in `mappings`; `safetensors_io` and
`dist_checkpoint_io` read and write the two formats one tensor at a time; `layout` names the
files of a megatron checkpoint directory. See docs/convert.md.
"""
