"""The checkpoint-convert stage: Hugging Face <-> megatron-core `dist_checkpointing`.

`convert.convert()` is the entry point (`megasft convert` on the command line). The weight
names are data, one table per model family (`megasft.megatron.families`), applied by
`mappings`; `safetensors_io` and `dist_checkpoint_io` read and write the two formats one
tensor at a time, as byte ranges copied by `tensor_bytes`, without importing torch: `torch_save_format` and `dcp_metadata`
write and read the files torch and DCP would (`dist_checkpoint_resharding`, with DCP itself,
reads what only DCP can reassemble); `layout` names the files of a megatron checkpoint
directory. See docs/convert.md.
"""
