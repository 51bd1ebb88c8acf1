"""torchrun as a subprocess, its output streamed, its failures explained (`--nproc N`).

torchrun (`torch.distributed.run`) starts one process per rank and, with `--tee 3`, copies
each rank's output both to its own console, prefixed `[defaultN]:`, and to per-rank files under
`--log-dir`. When a rank fails, torchrun prints its own launcher traceback, which says little;
we read the failing rank's stderr file instead and raise an error that ends with its last
lines, which is where the real cause is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from megasft.errors import LaunchError

FAILED_RANK = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
TAIL_LINES = 20


def torchrun_command(module: str, arguments: Sequence[str], nproc: int, log_dir: Path) -> list[str]:
    """The command line that runs `python -m module arguments` on `nproc` ranks of this machine.

    Args:
        module: the module each rank runs.
        arguments: its arguments.
        nproc: how many ranks.
        log_dir: where torchrun writes each rank's stdout and stderr.

    Returns:
        The command, starting with this Python interpreter.
    """
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",  # one node, a free rendezvous port chosen by torchrun
        "--nproc-per-node", str(nproc),
        "--log-dir", str(log_dir),
        "--tee", "3",  # each rank's stdout and stderr to the console and to its log files
        "-m", module, *arguments,
    ]  # fmt: skip


def run_torchrun(
    module: str,
    arguments: Sequence[str],
    nproc: int,
    log_dir: str | Path,
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] = lambda line: print(line, end="", flush=True),
) -> None:
    """Runs `python -m module arguments` on `nproc` local ranks and waits for it.

    Args:
        module, arguments, nproc, log_dir: as for `torchrun_command`.
        env: variables added to this process's environment for the ranks.
        echo: called with each line of output as it comes.

    Raises:
        LaunchError: naming the failing rank, its exit code and the end of its stderr.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    command = torchrun_command(module, arguments, nproc, log_dir)
    process_env = {**os.environ, **(env or {})}
    process_env.setdefault("PYTHONUNBUFFERED", "1")
    failure: tuple[int, int] | None = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=process_env
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            echo(line)
            match = FAILED_RANK.search(line)
            if match and failure is None:
                failure = (int(match.group(2)), int(match.group(1)))
        code = process.wait()
    if code == 0:
        return
    if failure is None:
        raise LaunchError(f"torchrun exited with code {code} before any rank failed")
    rank, exit_code = failure
    tail = _rank_stderr_tail(log_dir, rank)
    raise LaunchError(
        f"rank {rank} failed with exit code {exit_code}; the end of its output "
        f"(all logs under {log_dir}):\n{tail}"
    )


def _rank_stderr_tail(log_dir: Path, rank: int) -> str:
    """The last lines of the newest attempt's stderr of local rank `rank`."""
    candidates = sorted(log_dir.glob(f"*/attempt_*/{rank}/stderr.log"), key=os.path.getmtime)
    if not candidates:
        return "(no log file found)"
    lines = candidates[-1].read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-TAIL_LINES:]) or "(its stderr is empty)"
