"""Errors raised by checkpoint conversion."""

from megasft.errors import MegasftError


class CheckpointError(MegasftError):
    """A checkpoint that cannot be converted: missing or truncated files, wrong shapes,
    weights of another model family, or a target that already exists."""
