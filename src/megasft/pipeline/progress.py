"""Quiet local runs: one line as each step starts and ends, each step's full log in a file.

kfp.local prints everything a step writes, and its own log lines, on sys.stdout. In a quiet
run `StepLogs` stands in for sys.stdout: each line goes to the log file of the step kfp.local
is running (LOGS/STEP.log; lines outside any step to LOGS/pipeline.log), and the terminal hears
only when a step starts and ends, with its duration and key figures, or a failed step's last
lines. It recognises kfp.local's "Executing task 'x'" and "Task 'x' finished with status S"
lines; a line it does not recognise is filed, never lost. See docs/pipeline.md, "Running it".
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

PIPELINE_LOG = "pipeline"
"""The log of the lines that belong to no step (kfp.local's own, before and after the steps)."""
FAILED_STEP_LINES = 20
"""How many of a failed step's last lines the terminal gets."""

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r" - INFO - Executing task '(?P<task>[^']+)'$")
_FINISHED = re.compile(r" - \w+ - Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
_PIPELINE = re.compile(r" - \w+ - (?:Running pipeline|Pipeline ')")


class StepLogs(io.TextIOBase):
    """A text stream that files each line under the running step and reports steps' ends.

    Args:
        directory: where the log files go (created).
        terminal: where the one-line reports go (sys.stderr).
        figures: the key figures of a step that succeeded, by its task name ("" for none).
    """

    def __init__(
        self,
        directory: Path,
        terminal: TextIO,
        figures: Callable[[str], str] = lambda task: "",
    ) -> None:
        super().__init__()
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.files: dict[str, Path] = {}
        """The log file of each step, in the order the steps started, then pipeline.log."""
        self._terminal = terminal
        self._figures = figures
        self._pending = ""
        self._started: dict[str, float] = {}
        self._log = self._open(PIPELINE_LOG)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._file_line(_COLOUR.sub("", line))
        return len(text)

    def flush(self) -> None:
        if not self._log.closed:
            self._log.flush()

    def close(self) -> None:
        if not self.closed:
            if self._pending:
                self._file_line(_COLOUR.sub("", self._pending))
                self._pending = ""
            self._log.close()
            # pipeline.log last: the steps' logs are what a reader looks for.
            self.files[PIPELINE_LOG] = self.files.pop(PIPELINE_LOG)
        super().close()

    def _open(self, name: str) -> TextIO:
        path = self.directory / f"{name}.log"
        mode = "a" if name in self.files else "w"  # a new run starts each log afresh
        self.files[name] = path
        return path.open(mode, encoding="utf-8")

    def _switch(self, name: str) -> None:
        self._log.close()
        self._log = self._open(name)

    def _file_line(self, line: str) -> None:
        started = _STARTED.search(line)
        if started:
            task = started["task"]
            self._switch(task)
            self._started[task] = time.monotonic()
            self._say(f"{task} started")
        elif _PIPELINE.search(line):
            self._switch(PIPELINE_LOG)
        self._log.write(line + "\n")
        finished = _FINISHED.search(line)
        if finished:
            self._finish(finished["task"], finished["status"])

    def _finish(self, task: str, status: str) -> None:
        took = _duration(time.monotonic() - self._started.get(task, time.monotonic()))
        if status == "SUCCESS":
            try:
                figures = self._figures(task)
            except Exception as error:  # a report line must never fail the run
                figures = f"(no figures: {error})"
            self._say(f"{task} done in {took}" + (f": {figures}" if figures else ""))
            return
        self._log.flush()
        path = self.files.get(task, self.directory / f"{task}.log")
        lines = path.read_text(encoding="utf-8").splitlines()[-FAILED_STEP_LINES:]
        self._say(f"{task} FAILED after {took}; the end of {path}:")
        for line in lines:
            self._terminal.write(f"      | {line}\n")
        self._terminal.flush()

    def _say(self, text: str) -> None:
        self._terminal.write(f"  {time.strftime('%H:%M:%S')}  {text}\n")
        self._terminal.flush()


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"
