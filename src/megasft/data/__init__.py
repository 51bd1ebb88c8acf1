"""Chat and instruction data -> token ids and assistant-only loss masks, packed, as Arrow."""

from megasft.data.store import EXAMPLE_SCHEMA, open_split, read_examples, read_manifest

__all__ = ["EXAMPLE_SCHEMA", "open_split", "read_examples", "read_manifest"]
