"""`megasft pipeline compile`: the pipeline as KFP IR YAML, built from source, never committed."""

from __future__ import annotations

from pathlib import Path


def compile_pipeline(output: str | Path) -> Path:
    """Compile pipelines/sft_pipeline.py into `output` (a YAML file); returns its path.

    Image references are resolved now, from megasft.images and its environment overrides.
    """
    from kfp import compiler

    from megasft.pipeline.sources import sft_pipeline

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(sft_pipeline(), package_path=str(output))
    return output
