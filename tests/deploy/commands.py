"""The commands that CI workflows and manifests run, and whether the Makefile or the CLI has them."""

from __future__ import annotations

import re
import shlex

from tests.conftest import REPO


def megasft_subcommands() -> dict:
    """`megasft`'s subcommands: name -> parser (argparse keeps them on its subparsers action)."""
    from megasft.cli import build_parser

    (action,) = [action for action in build_parser()._actions if action.dest == "command"]
    return action.choices


def makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", line)
        if match and not line.startswith(("\t", ".PHONY")):
            targets.update(match.group(1).split())
    return targets


def commands(script: str) -> list[list[str]]:
    """The simple commands of a `run:` script: lines joined at backslashes, split at && || ; |."""
    joined = re.sub(r"\\\n", " ", script)
    found = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part)
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]  # VAR=value before the command
            if words:
                found.append(words)
    return found


def unknown_commands(script: str, targets: set[str], subcommands: set[str] | None) -> list[str]:
    """Commands that are neither `make TARGET...` with known targets nor `megasft SUBCOMMAND`."""
    unknown = []
    for words in commands(script):
        if words[0] == "make":
            names = [word for word in words[1:] if not word.startswith("-") and "=" not in word]
            unknown += [f"make {name}" for name in names if name not in targets]
        elif words[0] == "megasft":
            if subcommands is None:
                from megasft.cli import build_parser

                # argparse has no public way to list subcommands; its subparsers action holds them.
                (action,) = [
                    a
                    for a in build_parser()._actions
                    if hasattr(a, "choices") and a.dest == "command"
                ]
                subcommands = set(action.choices)
            if len(words) < 2 or words[1] not in subcommands:
                unknown.append(" ".join(words[:2]))
        else:
            unknown.append(words[0])
    return unknown
