"""A stage's settings declared once: the options made from them, their checks, their errors."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megasft.checkpoint.cli import ConvertConfig
from megasft.data.config import PrepareConfig
from megasft.errors import ConfigError
from megasft.evaluate.config import EvaluateConfig
from megasft.launch.cluster import ClusterLauncher
from megasft.launch.registry import launcher_classes
from megasft.pipeline.sections import NotifyConfig, TrackingConfig
from megasft.settings import (
    add_options,
    flag_of,
    given_settings,
    help_of,
    raise_problems,
    setting,
    setting_problems,
)
from megasft.train.config import TrainConfig
from tests.conftest import REPO


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in text.split(","):
        key, value = item.split("=")  # ValueError without "="
        pairs.append((key, value))
    return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class Example:
    inputs: tuple[str, ...] = setting(help="Files to read.", flag="--input", metavar="FILE")
    size: int = setting(4, "How many.", at_least=1)
    rate: float = setting(0.5, "How fast.", above=0)
    mode: str = setting("a", "Which way.", choices=("a", "b"))
    pairs: tuple[tuple[str, str], ...] = setting((), "Renames.", flag="--map", parse=_pairs)
    pack: bool = setting(True, "Pack them.")
    overwrite: bool = setting(False, "Replace them.")
    progress: bool = setting(True, "Show progress.", aliases={"--quiet": False})
    name: str | None = setting(None, "A name.")

    def __post_init__(self) -> None:
        raise_problems(setting_problems(self))


def _parser(layered: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, Example, layered=layered)
    return parser


def _config(*argv: str) -> Example:
    return Example(**given_settings(Example, _parser().parse_args(argv)))


def test_flags_left_out_take_the_dataclass_defaults():
    assert _config("--input", "a") == Example(inputs=("a",))


def test_every_kind_of_flag_sets_its_field():
    config = _config(
        "--input", "a", "b", "--size", "7", "--rate", "2.5", "--mode", "b", "--map", "x=y",
        "--no-pack", "--overwrite", "--quiet", "--name", "n",
    )  # fmt: skip
    assert config == Example(
        inputs=("a", "b"), size=7, rate=2.5, mode="b", pairs=(("x", "y"),), pack=False,
        overwrite=True, progress=False, name="n",
    )  # fmt: skip


def test_switches_off_by_default_have_no_negative_flag_unless_layered():
    flags = {flag for action in _parser()._actions for flag in action.option_strings}
    assert {"--pack", "--no-pack", "--overwrite", "--progress", "--no-progress"} <= flags
    assert "--no-overwrite" not in flags
    layered = {flag for action in _parser(layered=True)._actions for flag in action.option_strings}
    assert "--no-overwrite" in layered


def test_required_settings_are_required_options_unless_layered(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args([])
    assert "the following arguments are required: --input" in capsys.readouterr().err
    assert given_settings(Example, _parser(layered=True).parse_args([])) == {}


def test_choices_are_refused_by_the_option():
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'c'"):
        _parser().parse_args(["--input", "a", "--mode", "c"])


def test_a_parse_error_names_the_flag():
    with pytest.raises(ConfigError, match="--map: "):
        _config("--input", "a", "--map", "no-equals")


def test_help_shows_each_settings_text_and_its_default():
    help_text = " ".join(_parser().format_help().split())
    assert "--size N How many. (default: 4)" in help_text
    assert "--quiet the same as --no-progress" in help_text
    assert "--name VALUE A name." in help_text and "(default: None)" not in help_text


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        Example(inputs=("a",), size=0, rate=0.0, mode="c")
    assert str(caught.value) == (
        "3 problems: --size must be at least 1, got 0; --rate must be positive, got 0.0; "
        "--mode must be one of a, b, not 'c'"
    )
    with pytest.raises(ConfigError, match="^--size must be a number, not 'x'$"):
        Example(inputs=("a",), size="x")


def test_a_pipeline_section_names_settings_by_section_and_key():
    @dataclasses.dataclass(frozen=True)
    class Section:
        size: int = setting(4, "How many.", at_least=1)

    assert setting_problems(Section(size=0), section="example") == [
        "example.size must be at least 1, got 0"
    ]


def test_a_setting_needs_help_and_every_field_needs_to_be_a_setting():
    with pytest.raises(TypeError, match="help"):
        setting(1)

    @dataclasses.dataclass
    class Undeclared:
        size: int = 1

    with pytest.raises(TypeError, match="size: declare it with"):
        add_options(argparse.ArgumentParser(), Undeclared)


@pytest.mark.parametrize(
    "config_class",
    [
        PrepareConfig,
        ConvertConfig,
        TrainConfig,
        EvaluateConfig,
        TrackingConfig,
        NotifyConfig,
        *launcher_classes().values(),
    ],  # fmt: skip
)
def test_every_stage_setting_is_documented(config_class):
    for field in dataclasses.fields(config_class):
        assert help_of(field).endswith("."), field.name


@pytest.mark.parametrize("kind", sorted(launcher_classes()))
def test_the_launcher_table_names_every_launcher_setting(kind):
    """docs/train.md's launcher table: a launcher's row names its own settings; the settings
    every cluster launcher shares (ClusterLauncher's) are named once, on the pytorchjob row."""
    lines = (REPO / "docs" / "train.md").read_text().splitlines()
    row = {name: next(line for line in lines if line.startswith(f"| `{name}`"))
           for name in (kind, "pytorchjob")}  # fmt: skip
    shared = {field.name for field in dataclasses.fields(ClusterLauncher)}
    for field in dataclasses.fields(launcher_classes()[kind]):
        assert f"`{field.name}`" in row["pytorchjob" if field.name in shared else kind], field.name


def test_flags_keep_their_names():
    assert flag_of(TrainConfig, "tensor_parallel") == "--tp"
    assert flag_of(PrepareConfig, "inputs") == "--input"
    assert flag_of(PrepareConfig, "column_map") == "--map"
    assert flag_of(ConvertConfig, "max_shard_bytes") == "--max-shard-size"
    assert flag_of(EvaluateConfig, "max_new_tokens") == "--max-new-tokens"


def test_choices_from_a_registry_are_read_when_needed():
    registry = ["a"]

    @dataclasses.dataclass(frozen=True)
    class Pick:
        name: str = setting("a", "A registered name.", choices=lambda: registry)

        def __post_init__(self) -> None:
            raise_problems(setting_problems(self))

    registry.append("b")  # registered after the class was defined
    assert Pick(name="b").name == "b"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, Pick)
    assert given_settings(Pick, parser.parse_args(["--name", "b"])) == {"name": "b"}
    with pytest.raises(ConfigError, match="--name must be one of a, b, not 'c'"):
        Pick(name="c")
