"""Running one training job on Kubernetes, of any `JobKind`, and waiting for it: `run_job`.

Create the job, or take over an earlier attempt's (adopt a running one, report a succeeded one,
delete and create again a failed one); poll it until a terminal condition, following the
primary pod's log; delete it on a timeout, SIGTERM or KeyboardInterrupt. Why it works this way
(polling, deterministic names, owner references, what deletes a job): docs/train.md.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from megasft.launch.job_api import JobApi, JobError, JobKind, default_api_client, load_template
from megasft.launch.job_log import TAIL_LINES, LogFollower, Output
from megasft.launch.job_request import JobRequest

LOG_DRAIN_S = 15.0  # how long a finished job's last lines may take to arrive
DELETE_WAIT_S = 600.0  # a failed job's foreground deletion (its pods) before it is created again


class _Terminated(BaseException):
    """SIGTERM arrived; a BaseException so that no `except Exception` on the way swallows it."""


class _DeadlinePassed(Exception):
    """`timeout_s` has passed (not TimeoutError, which a socket's own timeout also raises)."""


@dataclass(frozen=True)
class JobResult:
    """A job that succeeded."""

    name: str
    namespace: str
    origin: str
    """How this call came to it: "created", "adopted" (an earlier attempt's job, still running),
    "recreated" (an earlier attempt's job had failed; deleted and created again, resuming from the
    newest checkpoint) or "already-succeeded" (an earlier attempt's job had finished)."""
    log_tail: tuple[str, ...]
    """The last lines of the primary pod's log."""
    seconds: float
    """From the call until the job's success was seen."""


def run_job(
    kind: JobKind,
    request: JobRequest,
    *,
    api_client: Any = None,
    template: Mapping[str, Any] | str | Path | None = None,
    poll_s: float = 10.0,
    log: TextIO | None = None,
) -> JobResult:
    """Runs `request` as a job of `kind` and waits for it; returns when it has succeeded.

    Args:
        kind: the job kind (`megasft.launch.pytorchjob.PYTORCHJOB`).
        request: the run.
        api_client: a `kubernetes.client.ApiClient`; default: the in-cluster configuration,
            else ~/.kube/config.
        template: the template as a dict or a YAML file (see `load_template`); default:
            `request.template_name` read from the cluster.
        poll_s: seconds between two polls of the job.
        log: where the primary pod's log and the launcher's own lines (prefixed with the kind
            in lower case, e.g. `pytorchjob:`) go; default: sys.stdout at the time of the call.

    Returns:
        The job's name, namespace, origin, last log lines and duration.

    Raises:
        JobError: when the job fails (with its condition message and the end of the primary
            pod's log), when `request.timeout_s` passes, on SIGTERM (after deleting the job), or
            when the job is deleted by someone else.
        KeyboardInterrupt: after deleting the job.
    """
    started = time.monotonic()
    deadline = None if request.timeout_s is None else started + request.timeout_s
    output = Output(log if log is not None else sys.stdout, kind.kind.lower())
    api_client = api_client if api_client is not None else default_api_client()
    api = JobApi(api_client, kind, request.name, request.namespace, retry_s=poll_s)
    follower = LogFollower(api, output, retry_s=poll_s)
    with _sigterm_raises():
        try:
            origin = _start(api, request, template, poll_s, deadline, output)
            follower.start()
            job = _wait(api, poll_s, deadline, output)
            follower.drain(LOG_DRAIN_S)
        except (_DeadlinePassed, KeyboardInterrupt, _Terminated) as interruption:
            follower.stop()
            raise _cancel(api, request, interruption, output) from None
        except BaseException:
            follower.stop()
            raise
    condition = kind.terminal_condition(job)
    assert condition is not None
    if condition["type"] == kind.failed:
        raise JobError(_failure_message(api, request, condition, follower.tail()), "failed")
    output.note(f"{kind.kind} {api.where} succeeded")
    return JobResult(
        request.name, request.namespace, origin, follower.tail(), time.monotonic() - started
    )


def _start(
    api: JobApi,
    request: JobRequest,
    template: Mapping[str, Any] | str | Path | None,
    poll_s: float,
    deadline: float | None,
    output: Output,
) -> str:
    """Creates the job or takes over an earlier attempt's; returns how (JobResult.origin)."""
    kind, where = api.kind, api.where
    existing = api.get()
    if existing is not None:
        condition = kind.terminal_condition(existing)
        if condition is None:
            output.note(f"adopting {kind.kind} {where}, started by an earlier attempt")
            return "adopted"
        if condition["type"] == kind.succeeded:
            output.note(f"{kind.kind} {where} already succeeded in an earlier attempt")
            return "already-succeeded"
        output.note(
            f"{kind.kind} {where} of an earlier attempt failed ({condition.get('message', '')}); "
            f"deleting it and starting again from the newest checkpoint in {request.save_dir}"
        )
        api.delete()
        _wait_until_gone(api, poll_s, deadline)
    if isinstance(template, str | Path):
        template = load_template(kind, template)
    elif template is None:
        template = api.read_template(request.template_name)
    job = kind.build(template, request)
    if not api.create(job):
        output.note(f"{kind.kind} {where} was created meanwhile by another attempt; adopting it")
        return "adopted"
    output.note(
        f"created {kind.kind} {where}: {request.nodes} node(s) x {request.gpus_per_node} "
        f"{request.gpu_resource}, image {kind.image_of(job)}"
    )
    return "created" if existing is None else "recreated"


def _wait_until_gone(api: JobApi, poll_s: float, deadline: float | None) -> None:
    limit = time.monotonic() + DELETE_WAIT_S
    if deadline is not None:
        limit = min(limit, deadline)
    while api.get() is not None:
        if time.monotonic() >= limit:
            raise JobError(
                f"{api.kind.kind} {api.where} is still being deleted (its pods are terminating); "
                "retry the step once it is gone (kubectl -n "
                f"{api.namespace} get {api.kind.kind.lower()} {api.name})",
                "api",
            )
        time.sleep(poll_s)


def _wait(api: JobApi, poll_s: float, deadline: float | None, output: Output) -> dict:
    """Polls the job until it has a terminal condition; returns it.

    Raises _DeadlinePassed at `deadline`, JobError when the job disappears.
    """
    reported: set[tuple[str, str]] = set()
    last_status = None
    while True:
        job = api.get()
        if job is None:
            raise JobError(
                f"{api.kind.kind} {api.where} was deleted while it ran (by someone else, or by "
                "garbage collection after its owner pod was deleted)",
                "deleted",
            )
        for condition in (job.get("status") or {}).get("conditions") or []:
            key = (condition["type"], condition.get("lastTransitionTime", ""))
            if condition.get("status") == "True" and key not in reported:
                reported.add(key)
                message = condition.get("message") or condition.get("reason") or ""
                output.note(f"{condition['type']}: {message}")
        status = api.kind.status_line(job) if api.kind.status_line else None
        if status and status != last_status:
            output.note(status)
            last_status = status
        if api.kind.terminal_condition(job) is not None:
            return job
        if deadline is None:
            time.sleep(poll_s)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlinePassed
        time.sleep(min(poll_s, remaining))


def _cancel(
    api: JobApi, request: JobRequest, interruption: BaseException, output: Output
) -> BaseException:
    """Deletes the job; returns what to raise for `interruption`."""
    job = f"{api.kind.kind} {api.where}"
    try:
        api.delete(fresh_connection=True)
        deleted = "deleted it"
    except JobError as error:
        deleted = f"could not delete it ({error}); its owner pod's deletion will"
    if isinstance(interruption, KeyboardInterrupt):
        output.note(f"interrupted: {job}: {deleted}")
        return interruption
    resume = f"the checkpoints in {request.save_dir} are kept; running the step again resumes"
    if isinstance(interruption, _DeadlinePassed):
        message = f"{job} did not finish within timeout_s={request.timeout_s}; {deleted}; {resume}"
        output.note(message)
        return JobError(message, "timeout")
    message = f"cancelled by SIGTERM: {job}: {deleted}; {resume}"
    output.note(message)
    return JobError(message, "cancelled")


def _failure_message(
    api: JobApi, request: JobRequest, condition: Mapping[str, Any], tail: Sequence[str]
) -> str:
    kind = api.kind
    try:
        primary, failed = api.primary_pod(), api.failed_pod()
    except JobError:  # the Role lets the launcher find no pod: the log followed so far must do
        primary, failed = None, None
    # The first pod that failed explains it best; else the primary pod, whose log was followed.
    lines = api.log_tail(failed, TAIL_LINES) if failed and failed != primary else []
    if lines:
        whose = f"log of {failed}, the first pod that failed"
    else:
        lines = list(tail) or (api.log_tail(primary, TAIL_LINES) if primary else [])
        whose = f"{kind.primary}'s log ({primary or 'no pod found'})"
    reason = condition.get("reason", "")
    message = condition.get("message", "(no message)")
    return (
        f"{kind.kind} {api.where} failed: {reason + ': ' if reason else ''}{message}\n"
        f"The end of the {whose}:\n"
        + ("\n".join(lines) if lines else "(empty)")
        + f"\nThe job is kept for inspection (kubectl -n {api.namespace} describe "
        f"{kind.kind.lower()} {api.name}); running the step again deletes it and resumes from "
        f"the newest checkpoint in {request.save_dir}."
    )


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises _Terminated in the main thread (once; a second one is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    received = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
