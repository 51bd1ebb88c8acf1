"""A stage's settings, declared once on its config dataclass, and the command line made from them.

Each field of a stage config is declared with `setting(default, help, ...)`: its default, its
help text, its flag and its checks live in the field (the help in `field.metadata`, where it
can be read at run time, unlike a docstring under the field). `add_options` turns the fields
into argparse options, `given_settings` reads back what the command line gave, and
`setting_problems` + `raise_problems` check the declared limits, gathering every problem into
one ConfigError. Why a small helper over argparse rather than tyro or jsonargparse: docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from megasft.errors import ConfigError

_KEY = "megasft.setting"
_METAVARS = {int: "N", float: "X", str: "VALUE"}


@dataclasses.dataclass(frozen=True)
class _Declaration:
    help: str
    flag: str | None
    metavar: str | None
    choices: tuple | Callable[[], Sequence[Any]] | None
    at_least: float | None
    above: float | None
    parse: Callable[[str], Any] | None
    aliases: Mapping[str, Any]


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    flag: str | None = None,
    metavar: str | None = None,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    at_least: float | None = None,
    above: float | None = None,
    parse: Callable[[str], Any] | None = None,
    aliases: Mapping[str, Any] | None = None,
) -> Any:
    """A config dataclass field with what its documentation, option and checks need.

    Args:
        default: the default; leave it out (and give `help=`) for a required setting.
        help: what the setting means: the field's documentation and its option's help.
        default_factory: as for `dataclasses.field`, for a default computed on construction.
        flag: the option's name when it is not the field's name with dashes (`--tp`).
        metavar: the placeholder in --help (N, DIR, FILE, ...).
        choices: the allowed values, or a function that returns them when they are needed
            (a registry that may grow after import); the option refuses others, and
            `setting_problems` too.
        at_least: the smallest allowed number (checked by `setting_problems`).
        above: a number the value must exceed (checked by `setting_problems`).
        parse: turns the option's text into the value, e.g. "a=b,c=d" into pairs; a
            ConfigError or ValueError it raises is reported naming the flag.
        aliases: more flags that each set a fixed value, e.g. {"--quiet": False}.

    Returns:
        A `dataclasses.Field` for the class body.

    Raises:
        TypeError: no help text (every setting is documented).
    """
    if not help.strip():
        raise TypeError("every setting needs a help text")
    declaration = _Declaration(
        help=" ".join(help.split()),
        flag=flag,
        metavar=metavar,
        choices=choices if choices is None or callable(choices) else tuple(choices),
        at_least=at_least,
        above=above,
        parse=parse,
        aliases=dict(aliases or {}),
    )
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_KEY: declaration}
    )


def help_of(field: dataclasses.Field) -> str:
    """A setting's help text (its documentation).

    Args:
        field: a field declared with `setting`.

    Returns:
        The help text, whitespace collapsed.
    """
    return _declaration(field).help


def flag_of(config: Any, name: str) -> str:
    """The command-line flag of a setting, which error messages name (`--tp`, `--seq-length`).

    Args:
        config: a config dataclass or an instance of one.
        name: the field's name.

    Returns:
        The flag, with its dashes.
    """
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return _flag(field)


def add_options(
    parser: argparse.ArgumentParser, config_class: type, *, layered: bool = False
) -> None:
    """One option per field of `config_class`, each defaulting to None ("not given").

    Defaults stay in the dataclass: `given_settings` leaves out what was not given, so the
    dataclass fills it in. Switches (bool fields) get `--x/--no-x`, or only `--x` when their
    default is False and `layered` is not set. A tuple field takes one or more values.

    Args:
        parser: the (sub)command's parser.
        config_class: a dataclass whose fields were all declared with `setting`.
        layered: the settings may also come from a file read first (train's `--config`):
            then no option is required, and every switch can be turned off as well as on.

    Raises:
        TypeError: a field not declared with `setting`.
    """
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        declaration = _declaration(field)
        kind = _base_type(hints[field.name])
        flag = _flag(field)
        options: dict[str, Any] = {"dest": field.name, "default": None}
        required = _default(field) is dataclasses.MISSING
        if kind is bool:
            plain_switch = _default(field) is False and not layered
            options["action"] = "store_true" if plain_switch else argparse.BooleanOptionalAction
        else:
            if declaration.parse is None and typing.get_origin(kind) is tuple:
                options["nargs"] = "+"
                kind = typing.get_args(kind)[0]
            options["type"] = str if declaration.parse else kind
            options["metavar"] = declaration.metavar or _METAVARS.get(kind, "VALUE")
            if declaration.choices is not None:
                options["choices"] = _choices(declaration)
                options["metavar"] = declaration.metavar
            options["required"] = required and not layered
        parser.add_argument(flag, help=_help_text(field), **options)
        for alias, value in declaration.aliases.items():
            parser.add_argument(
                alias,
                dest=field.name,
                action="store_const",
                const=value,
                help=f"the same as {_flag_for_value(flag, value)}",
            )


def given_settings(config_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gave, ready for `config_class(**settings)`.

    Args:
        config_class: the dataclass `add_options` made the options from.
        args: the parsed command line.

    Returns:
        Field name -> value for each option given (None means not given), parsed by the
        field's `parse` and with lists made tuples.

    Raises:
        ConfigError: a `parse` refused the text; the message names the flag.
    """
    settings = {}
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        parse = _declaration(field).parse
        if parse is not None:
            try:
                value = parse(value)
            except ConfigError:
                raise
            except ValueError as error:
                raise ConfigError(f"{_flag(field)}: {error}") from None
        elif isinstance(value, list):
            value = tuple(value)
        settings[field.name] = value
    return settings


def setting_problems(config: Any, section: str | None = None) -> list[str]:
    """What breaks the declared choices and limits of a config's settings.

    Args:
        config: a config dataclass instance (checked from its `__post_init__`).
        section: name settings `SECTION.FIELD` (a pipeline section) instead of by flag.

    Returns:
        One message per problem, naming the setting; empty when all is well.
    """
    problems = []
    for field in dataclasses.fields(config):
        declaration = field.metadata.get(_KEY)
        value = getattr(config, field.name)
        if declaration is None or value is None:
            continue
        name = f"{section}.{field.name}" if section else _flag(field)
        if declaration.choices is not None and value not in _choices(declaration):
            known = ", ".join(str(choice) for choice in _choices(declaration))
            problems.append(f"{name} must be one of {known}, not {value!r}")
        limits = (declaration.at_least, declaration.above)
        if all(limit is None for limit in limits):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{name} must be a number, not {value!r}")
        elif declaration.at_least is not None and value < declaration.at_least:
            least = declaration.at_least
            bound = "not be negative" if least == 0 else f"be at least {least}"
            problems.append(f"{name} must {bound}, got {value}")
        elif declaration.above is not None and value <= declaration.above:
            bound = "be positive" if declaration.above == 0 else f"be above {declaration.above}"
            problems.append(f"{name} must {bound}, got {value}")
    return problems


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one ConfigError carrying every problem, or nothing when there are none.

    Args:
        problems: messages, each naming its setting.

    Raises:
        ConfigError: the one problem's message, or "N problems: a; b; ..." for several.
    """
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems: " + "; ".join(problems))


def _declaration(field: dataclasses.Field) -> _Declaration:
    try:
        return field.metadata[_KEY]
    except KeyError:
        raise TypeError(f"{field.name}: declare it with megasft.settings.setting") from None


def _choices(declaration: _Declaration) -> tuple:
    choices = declaration.choices
    return tuple(choices() if callable(choices) else choices)


def _flag(field: dataclasses.Field) -> str:
    declaration = field.metadata.get(_KEY)
    return (declaration and declaration.flag) or "--" + field.name.replace("_", "-")


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _help_text(field: dataclasses.Field) -> str:
    text = help_of(field)
    default = _default(field)
    if default not in (dataclasses.MISSING, None, ()):
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def _flag_for_value(flag: str, value: Any) -> str:
    if value is True:
        return flag
    if value is False:
        return "--no-" + flag.removeprefix("--")
    return f"{flag} {value}"


def _base_type(hint: Any) -> Any:
    """`int` for `int | None`: the type an option's text converts to."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint
