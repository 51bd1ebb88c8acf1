"""Outputs that appear complete or not at all: build beside the target, then rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def move_into_place(staging: Path, output: Path) -> None:
    """Renames the finished `staging` directory to `output`, replacing an existing one.

    An existing `output` is renamed aside first and deleted after, so at every moment the
    name holds either the old complete directory or the new one.
    """
    if output.exists():
        retired = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)
