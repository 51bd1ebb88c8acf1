"""The `local` launcher: training in the pipeline step's own process, as `megasft train` does.

With `train.nproc` above 1, `megasft.train.stage.run_training` starts torchrun with that many
local ranks. Checkpoints go straight to the step's output, so a retried step resumes from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from megasft.launch.registry import Layout, TrainingPlan, register_launcher


@register_launcher
@dataclass(frozen=True)
class LocalLauncher:
    """`launcher.kind: local` (the default): torchrun in the step; no settings of its own."""

    kind: ClassVar[str] = "local"
    runs_in_step: ClassVar[bool] = True

    def layout(self, settings: Mapping[str, Any]) -> Layout:
        """What the train settings ask for: `nproc` processes, on `nodes` nodes (default 1)."""
        return Layout(
            settings.get("nproc") or 1, settings.get("nodes") or 1, "train.nproc", "train.nodes"
        )

    def run(self, plan: TrainingPlan) -> dict[str, Any]:
        """Trains `plan` with `megasft.train.stage.run_training`, saving into `plan.output`.

        Args:
            plan: the run.

        Returns:
            The training summary.

        Raises:
            ConfigError, InputError: for settings or inputs the training stage refuses.
            LaunchError: when a rank fails.
        """
        from megasft.train.config import TrainConfig
        from megasft.train.stage import run_training

        config = TrainConfig(
            data=str(plan.dataset),
            load=str(plan.base_checkpoint),
            save=str(plan.output),
            **plan.settings,
        )
        return run_training(config)
