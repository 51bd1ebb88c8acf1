"""The pipeline's sources, components/ and pipelines/ at the top of the repository.

Installed, they are the packages megasft._components and megasft._pipelines (setup.py maps
the folders there). Run from a checkout (PYTHONPATH=src, or an editable install), the same
names are bound to the folders beside the src/ that megasft was imported from, so a checkout
always compiles its own pipeline. Either way the pipeline imports `megasft._components.*`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import megasft

FOLDERS = {"megasft._components": "components", "megasft._pipelines": "pipelines"}
"""Package name -> its folder at the top of the repository."""


def checkout_root() -> Path | None:
    """The repository whose src/ megasft was imported from; None for an installed package."""
    root = Path(megasft.__file__).resolve().parents[2]
    if all((root / folder / "__init__.py").is_file() for folder in FOLDERS.values()):
        return root
    return None


def _bind_checkout_folders() -> None:
    root = checkout_root()
    if root is None:
        return  # installed: the packages are in site-packages beside megasft
    for name, folder in FOLDERS.items():
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(
            name, root / folder / "__init__.py", submodule_search_locations=[str(root / folder)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(megasft, name.rpartition(".")[2], module)


def pipelines_package() -> ModuleType:
    """The package of pipelines/ (megasft._pipelines), from the checkout or installed.

    Returns:
        The imported package; its `__path__` is where pipelines/ is.
    """
    _bind_checkout_folders()
    return importlib.import_module("megasft._pipelines")


def sft_pipeline() -> Any:
    """The KFP pipeline function of pipelines/sft_pipeline.py.

    Returns:
        `sft_pipeline`, a KFP GraphComponent: call it under kfp.local or compile it.
    """
    pipelines_package()
    return importlib.import_module("megasft._pipelines.sft_pipeline").sft_pipeline


def configs_directory() -> Path:
    """pipelines/configs, where the named run configurations live.

    Returns:
        The directory, in the checkout or in the installed package.
    """
    return Path(next(iter(pipelines_package().__path__))) / "configs"
