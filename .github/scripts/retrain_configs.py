"""Which run configurations .github/workflows/retrain.yml retrains, as a JSON list of names.

    python3 .github/scripts/retrain_configs.py    # reads the GitHub event from the environment

- push: the configurations whose file (pipelines/configs/NAME.yaml) or data pointer
  (data/pointers/NAME.yaml) changed between BEFORE and AFTER; a deleted configuration is not
  retrained;
- schedule: SCHEDULED_CONFIG (the production configuration);
- workflow_dispatch: INPUT_CONFIG.

Environment: EVENT_NAME, BEFORE, AFTER, INPUT_CONFIG, SCHEDULED_CONFIG; GITHUB_OUTPUT, when set,
receives `configs=<JSON list>`. Standard library only: it runs before the project is set up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

CONFIGS = "pipelines/configs"
POINTERS = "data/pointers"
NO_COMMIT = "0" * 40  # GitHub's `before` for a newly created branch
TRACKED = re.compile(rf"^(?:{re.escape(CONFIGS)}|{re.escape(POINTERS)})/([^/]+)\.yaml$")


def configs_for_paths(paths: list[str], existing: set[str]) -> list[str]:
    """The configurations that the changed `paths` (relative to the repository) touch."""
    names = {match.group(1) for path in paths if (match := TRACKED.match(path))}
    return sorted(names & existing)


def changed_paths(before: str, after: str) -> list[str]:
    if not before or before == NO_COMMIT:
        before = f"{after}^"  # a new branch: the last commit's own changes
    result = subprocess.run(
        ["git", "diff", "--name-only", before, after], capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"retrain_configs: git diff {before} {after} failed: {result.stderr.strip()}")
    return result.stdout.split()


def configs_to_retrain(environ: dict[str, str], repository: Path) -> list[str]:
    existing = {path.stem for path in (repository / CONFIGS).glob("*.yaml")}
    event = environ.get("EVENT_NAME", "")
    if event == "push":
        return configs_for_paths(changed_paths(environ["BEFORE"], environ["AFTER"]), existing)
    if event == "schedule":
        name = environ.get("SCHEDULED_CONFIG", "")
    elif event == "workflow_dispatch":
        name = environ.get("INPUT_CONFIG", "")
    else:
        sys.exit(f"retrain_configs: unexpected event {event!r}")
    if name not in existing:
        sys.exit(
            f"retrain_configs: no configuration {name!r} in {CONFIGS}; "
            f"known: {', '.join(sorted(existing))}"
        )
    return [name]


def main() -> None:
    configs = configs_to_retrain(dict(os.environ), Path.cwd())
    line = f"configs={json.dumps(configs)}"
    print(line)
    if os.environ.get("GITHUB_OUTPUT"):
        with open(os.environ["GITHUB_OUTPUT"], "a", encoding="utf-8") as output:
            output.write(line + "\n")


if __name__ == "__main__":
    main()
