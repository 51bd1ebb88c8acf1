"""Following the primary pod's log of a cluster job into the step's log, across restarts.

A thread follows the training container's log (`follow=true`, with timestamps), writes each
line and keeps the last ones for error messages. When the stream ends (the container restarted,
the pod is not there yet, the connection dropped) it reconnects, asking only for the lines since
the last one it saw, and skips what it already wrote by the kubelet's timestamps. After the job
ends it reads once more, so that the last lines are written. See docs/train.md.
"""

from __future__ import annotations

import calendar
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from typing import Any, TextIO

from megasft.launch.job_api import JobApi, JobError, api_error

TAIL_LINES = 30
LOG_SKEW_MARGIN_S = 60  # reconnecting asks for this much more log than strictly needed


class Output:
    """The step's log, written to from the launcher and the log thread, a whole line at a time."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self._stream = stream
        self._prefix = prefix
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        """Writes `text` as it is (a line of the training log)."""
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def note(self, text: str) -> None:
        """Writes one of the launcher's own lines: `prefix: text`."""
        self.line(f"{self._prefix}: {text}")


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


def _log_time(stamp: str) -> tuple[int, int] | None:
    """An RFC 3339 timestamp of the kubelet (nanoseconds, trailing zeros trimmed) as (s, ns)."""
    match = _TIMESTAMP.fullmatch(stamp)
    if match is None:
        return None
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    return seconds, int((match.group(2) or "0").ljust(9, "0"))


class LogFollower:
    """Follows the primary pod's training-container log in a thread: writes new lines, keeps the
    last ones.

    Lines are told apart by the kubelet's timestamps. `_last` is the newest timestamp written and
    `_written_at_last` how many lines carried it, so that a stream read again after a reconnect
    skips exactly what was written before, even lines that share one timestamp.
    """

    def __init__(self, api: JobApi, output: Output, retry_s: float) -> None:
        self._api = api
        self._output = output
        self._retry_s = retry_s
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._last: tuple[int, int] | None = None
        self._written_at_last = 0
        self._replayed_at_last = 0  # lines at `_last` seen again in the current stream
        self._job_over = threading.Event()
        self._stopped = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"log {api.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def tail(self) -> tuple[str, ...]:
        """The last lines written."""
        return tuple(self._tail)

    def drain(self, timeout_s: float) -> None:
        """The job is over: read what is left of the log, waiting at most `timeout_s`."""
        self._job_over.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.stop()

    def stop(self) -> None:
        """Stop now; lines not read yet are not written."""
        if not self._thread.is_alive():
            return
        self._stopped.set()
        self._job_over.set()
        response = self._response
        if response is not None:
            # Unblocks a read in progress (urllib3 >= 2.3); closing alone may not.
            with suppress(AttributeError, ValueError, RuntimeError, OSError):
                response.shutdown()
        self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stopped.is_set():
            final = self._job_over.is_set()  # a pass that starts after the end reads the last lines
            self._follow_once()
            if final:
                return
            self._job_over.wait(self._retry_s)

    def _follow_once(self) -> None:
        import urllib3
        from kubernetes.client import ApiException

        try:
            pod = self._api.primary_pod()
        except JobError as error:
            self._give_up(error)
            return
        if pod is None:
            return  # not created yet: retry later
        since = None
        if self._last is not None:
            since = max(1, int(time.time() - self._last[0]) + LOG_SKEW_MARGIN_S)
        try:
            response = self._api.open_log(pod, since)
        except ApiException as error:
            if error.status in (401, 403):  # the Role lacks it: asking again cannot help
                reading = f"reading the log of pod {pod}"
                self._give_up(api_error(error, reading, ("get", "pods/log")))
            return  # no pod yet (404), container not started (400): retry later
        except (urllib3.exceptions.HTTPError, OSError):
            return  # no connection: retry later
        self._response = response
        ended = False  # the server ended the stream; else its connection is closed, not reused
        try:
            self._replayed_at_last = 0
            for raw in _lines(response):
                if self._stopped.is_set():
                    return
                self._take(raw)
            ended = True
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError):
            pass  # dropped or shut down: the next pass picks up after _last
        finally:
            self._response = None
            if not ended:
                response.close()
            response.release_conn()

    def _give_up(self, error: JobError) -> None:
        """Stops following for good, saying why in the step's log; the job is still waited for."""
        self._output.note(f"not following the log: {error}")
        self._stopped.set()

    def _take(self, raw: str) -> None:
        """Writes a line of the stream unless an earlier stream wrote it."""
        stamp, _, text = raw.partition(" ")
        when = _log_time(stamp)
        if when is None:  # not a timestamped line: write it as it is
            self._write(raw)
            return
        if self._last is not None and when <= self._last:
            if when < self._last:
                return
            self._replayed_at_last += 1
            if self._replayed_at_last <= self._written_at_last:
                return
            self._written_at_last += 1
        else:
            self._last, self._written_at_last, self._replayed_at_last = when, 1, 1
        self._write(text)

    def _write(self, text: str) -> None:
        self._tail.append(text)
        self._output.line(text)


def _lines(response: Any) -> Iterator[str]:
    """The lines of a streamed HTTP response as they arrive (not when a buffer fills)."""
    read = getattr(response, "read1", None)
    chunks = iter(lambda: read(65536), b"") if read else response.stream(None)
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")
