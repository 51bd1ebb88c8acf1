"""The pipeline's own sections of a run configuration, typed: `tracking` and `notify`.

Each is a frozen dataclass whose fields are declared with `megasft.settings.setting` and checked
on construction; errors name the setting as `SECTION.KEY`. `megasft.pipeline.config` reads
them from a run configuration (docs/pipeline.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megasft.settings import raise_problems, setting, setting_problems


@dataclass(frozen=True)
class TrackingConfig:
    """The `tracking` section: where the run is recorded in MLflow and its model registered.

    An empty value means "not set", as a YAML placeholder `key: ""` does."""

    uri: str | None = setting(
        None,
        "MLflow tracking URI (http(s)://HOST:PORT, sqlite:///FILE, ...); none: no tracking. A "
        "relative sqlite:/// path is resolved against the directory the run starts from.",
    )
    experiment: str | None = setting(
        None, "MLflow experiment of the run and its steps; default: megasft-NAME."
    )
    registered_model: str | None = setting(
        None,
        "The registered model that the tuned model becomes a version of when the gate passes; "
        "default: the configuration's name.",
    )
    alias: str = setting("champion", "The alias that the registered version gets.")

    def __post_init__(self) -> None:
        _unset_blanks(self)
        raise_problems(_text_problems(self, "tracking"))


@dataclass(frozen=True)
class NotifyConfig:
    """The `notify` section: who hears of the run's end."""

    webhook: str | None = setting(
        None,
        "An http(s) URL that receives the run's final status as JSON (POST), whatever it was; "
        "none: no notification.",
    )

    def __post_init__(self) -> None:
        _unset_blanks(self)
        problems = _text_problems(self, "notify")
        webhook = self.webhook
        if isinstance(webhook, str) and not webhook.startswith(("http://", "https://")):
            problems.append(f"notify.webhook {webhook!r}: give an http:// or https:// URL, or none")
        raise_problems(problems)


def _unset_blanks(config: Any) -> None:
    """Empty text means "not set" (a YAML placeholder `key: ""`): the field's default."""
    for item in dataclasses.fields(config):
        if getattr(config, item.name) == "":
            object.__setattr__(config, item.name, item.default)  # frozen: set in construction


def _text_problems(config: Any, section: str) -> list[str]:
    """The declared checks, and that each setting is text or none."""
    problems = setting_problems(config, section)
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if value is not None and not isinstance(value, str):
            problems.append(f"{section}.{item.name} must be text, not {value!r}")
    return problems
