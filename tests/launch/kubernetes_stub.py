"""A stub of the Kubernetes API server for the cluster launchers' tests: no cluster, no operator.

`KubernetesStub` is an `http.server` in a thread that answers the handful of requests the
launcher machinery (`megasft.launch.job_api`) makes, the way the API server answers them, from
scripted state. The job resource is its `job_kind`'s (PyTorchJobs unless told otherwise):

    POST   /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs          create (409 if it exists)
    GET    /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs/NAME     get: each GET serves the next
                                                                    status of the job's script
    DELETE /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs/NAME     delete; as with foreground
                                                                    deletion, one more GET still
                                                                    finds it (deletionTimestamp set)
    GET    /api/v1/namespaces/NS/pods/POD/log                       the log of the pod's current
                                                                    container, chunked, as with
                                                                    follow=true
    GET    /api/v1/namespaces/NS/pods?labelSelector=K=V,...         the pods in `pods` whose labels
                                                                    match (a PodList)

A pod's log is a list of container runs. A follow request serves the current run with the
kubelet's timestamps (two lines per millisecond, so that some lines share one) and ends, and the
next request gets the next run: the container restarted. The last run is served again on every
later request (a finished container), or, with `hold_log_open`, the stream stays open until the
job is deleted (a container still running). Anything else is answered 404 and kept in
`unexpected`, so that a test sees a call the launcher's Role would not allow; a request whose
rule is in `forbidden` is answered 403 as RBAC answers it.

The real `kubernetes.client` talks to it: `stub.api_client()`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from megasft.launch.job_api import JobKind
from megasft.launch.pytorchjob import PYTORCHJOB

PODS_PREFIX = "/api/v1/namespaces/"
JOBSET_LABELS = (
    "jobset.sigs.k8s.io/jobset-name",
    "jobset.sigs.k8s.io/replicatedjob-name",
    "jobset.sigs.k8s.io/job-index",
)


def status(phase: str, message: str = "", at: int = 0) -> dict:
    """A PyTorchJob status as the training operator writes it, for a job in `phase`.

    `at` makes the transition times of repeated phases differ (a second Running after a
    Restarting is a new transition).
    """
    stamp = f"2025-01-01T00:00:{at:02d}Z"

    def condition(kind: str, state: str = "True", text: str = "") -> dict:
        return {
            "type": kind,
            "status": state,
            "reason": f"PyTorchJob{kind}",
            "message": text or f"PyTorchJob is {kind.lower()}.",
            "lastTransitionTime": stamp,
            "lastUpdateTime": stamp,
        }

    created = condition("Created")
    phases = {
        "Created": [created],
        "Running": [created, condition("Running")],
        "Restarting": [
            created,
            condition("Running", "False"),
            condition("Restarting", text=message),
        ],
        "Succeeded": [created, condition("Running", "False"), condition("Succeeded", text=message)],
        "Failed": [created, condition("Running", "False"), condition("Failed", text=message)],
    }
    return {"conditions": phases[phase]}


def trainjob_status(phase: str, message: str = "", at: int = 0, progress: dict | None = None):
    """A TrainJob status as Kubeflow Trainer v2.3 writes it: `Created` once its JobSet exists,
    then `Complete` or `Failed`; `progress` is a `trainerStatus` (where the trainer reports it)."""
    stamp = f"2025-01-01T00:00:{at:02d}Z"

    def condition(kind: str, reason: str, text: str, when: str = stamp) -> dict:
        return {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": text,
            "lastTransitionTime": when,
        }

    created = condition(
        "Created", "JobsCreationSucceeded", "Succeeded to create Jobs", "2025-01-01T00:00:00Z"
    )
    ended = {
        "Created": [],
        "Complete": [condition("Complete", "JobSetCompleted", message or "jobset completed")],
        "Failed": [condition("Failed", "JobSetFailed", message or "jobset failed")],
    }
    status = {"conditions": [created, *ended[phase]]}
    if progress is not None:
        status["trainerStatus"] = {"lastUpdatedTime": stamp, **progress}
    return status


def jobset_pod(
    job: str,
    node: int,
    suffix: str,
    created: int = 0,
    exit_code: int | None = None,
    finished_at: int = 0,
) -> dict:
    """A pod of a TrainJob's `node` job as JobSet and the Job controller label it; `exit_code`:
    its `node` container has ended with it (at `finished_at`)."""
    state = {"running": {}}
    if exit_code is not None:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "finishedAt": f"2025-01-01T01:00:{finished_at:02d}Z",
            }
        }
    return {
        "metadata": {
            "name": f"{job}-node-0-{node}-{suffix}",
            "labels": dict(zip(JOBSET_LABELS, (job, "node", "0"), strict=True))
            | {"batch.kubernetes.io/job-completion-index": str(node)},
            "creationTimestamp": f"2025-01-01T00:00:{created:02d}Z",
        },
        "spec": {"containers": [{"name": "node", "image": "trainer"}]},
        "status": {
            "phase": "Failed" if exit_code else "Running",
            "containerStatuses": [{"name": "node", "state": state}],
        },
    }


@dataclass
class StubJob:
    body: dict
    script: list[dict]
    """Statuses served one per GET; the last one repeats."""
    gets: int = 0
    position: int = 0
    """The status of the script served next."""
    deleting: bool = False


@dataclass
class KubernetesStub:
    """A stub Kubernetes API server (see the module's docstring); use it as a context manager."""

    jobs: dict[str, StubJob] = field(default_factory=dict)
    scripts: dict[str, list[dict]] = field(default_factory=dict)
    """The script of a job created later, by name."""
    logs: dict[str, list[list[str]]] = field(default_factory=dict)
    """Pod name -> container runs -> lines (without timestamps)."""
    hold_log_open: bool = False
    log_unavailable: int = 0
    """The first this many log requests are answered 400: the container is still being created."""
    status_waits_for_log: bool = False
    """Jobs stay at their script's first status until the master's log has been opened once:
    the container runs for a while, so that its first run's lines are read while it lasts."""
    drop_first_stream_after: int | None = None
    """End the first log stream after this many lines, as a dropped connection does."""
    failing_gets: list[int] = field(default_factory=list)
    """Status codes that the next GETs of a job are answered with, one each (500, 403, ...)."""
    create_conflicts: int = 0
    """The first this many creates find that another client created the job just before (409)."""
    on_get: Callable[[str, int], None] | None = None
    """Called with the job's name and the number of its GETs so far, after answering one."""
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    """(method, path, query) of every request."""
    created: list[dict] = field(default_factory=list)
    deleted: list[tuple[str, dict]] = field(default_factory=list)
    """(name, query) of every DELETE."""
    unexpected: list[str] = field(default_factory=list)
    pods: dict[str, dict] = field(default_factory=dict)
    """Pod name -> pod (see `jobset_pod`), for pod listings."""
    forbidden: set[tuple[str, str, str]] = field(default_factory=set)
    """Rules (API group, resource, verb) the caller lacks: their requests are answered 403."""
    job_kind: JobKind = PYTORCHJOB
    """The kind of job served, under /apis/GROUP/VERSION/namespaces/NS/PLURAL."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Event()  # set when a job is deleted or the stub stops
        self._log_runs: dict[str, int] = {}
        # Container runs in the order they first ran, over all pods: a later run, of any pod,
        # has later timestamps (as a restarted job's new primary pod has).
        self._run_order: dict[tuple[str, int], int] = {}
        self._log_streams = 0
        self._epoch = time.time() - 50  # log timestamps start 50 s ago, so sinceSeconds applies

    # --- setting up ---

    def seed(self, body: dict, *script: dict) -> None:
        """A job that exists before the launcher starts (an earlier attempt's, or the template)."""
        self.jobs[body["metadata"]["name"]] = StubJob(body, list(script) or [{}])

    def script(self, name: str, *statuses: dict) -> None:
        self.scripts[name] = list(statuses)

    # --- serving ---

    def __enter__(self) -> KubernetesStub:
        stub = self

        class Handler(_Handler):
            pass

        Handler.stub = stub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def api_client(self):
        from kubernetes import client

        configuration = client.Configuration(host=self.url)
        configuration.retries = 0  # the launcher's own retries are under test, not urllib3's
        return client.ApiClient(configuration)

    def rbac_requests(self) -> set[tuple[str, str, str]]:
        """(API group, resource, verb) of every request, as RBAC names them."""
        return {self.rule(method, path) for method, path, _ in self.requests} - {None}

    def rule(self, method: str, path: str) -> tuple[str, str, str] | None:
        """The RBAC rule a request needs; None for one the stub does not serve."""
        if path.startswith(self.jobs_prefix):
            verb = {"POST": "create", "GET": "get", "DELETE": "delete"}[method]
            return (self.job_kind.group, self.job_kind.plural, verb)
        if path.endswith("/log"):
            return ("", "pods/log", "get")
        if path.startswith(PODS_PREFIX) and path.endswith("/pods"):
            return ("", "pods", "list")
        return None

    @property
    def jobs_prefix(self) -> str:
        return f"/apis/{self.job_kind.group}/{self.job_kind.version}/namespaces/"

    def _timestamp(self, order: int, index: int) -> float:
        return self._epoch + order * 10 + (index // 2) * 0.001

    # Each method below runs in a server thread and answers one request.

    def create(self, body: dict) -> tuple[int, dict]:
        name = body["metadata"]["name"]
        with self._lock:
            if self.create_conflicts > 0:  # another client's create wins the race
                self.create_conflicts -= 1
                self.jobs[name] = StubJob(body, self.scripts.pop(name, None) or [{}])
            if name in self.jobs:
                return 409, _status_body(
                    409, "AlreadyExists", f'{self.job_kind.plural} "{name}" already exists'
                )
            stored = json.loads(json.dumps(body))
            stored["metadata"].update(
                uid=str(uuid.uuid4()),
                resourceVersion="1",
                creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            self.jobs[name] = StubJob(stored, self.scripts.pop(name, None) or [{}])
            self.created.append(body)
            return 201, stored

    def get(self, name: str) -> tuple[int, dict]:
        with self._lock:
            if self.failing_gets:
                code = self.failing_gets.pop(0)
                return code, _status_body(code, "InternalError", f"scripted failure {code}")
            job = self.jobs.get(name)
            if job is None:
                return 404, _status_body(
                    404, "NotFound", f'{self.job_kind.plural} "{name}" not found'
                )
            if job.deleting:  # foreground deletion: found once more, then gone
                del self.jobs[name]
                body = dict(job.body, metadata={**job.body["metadata"], "deletionTimestamp": "x"})
                return 200, body
            current = job.script[min(job.position, len(job.script) - 1)]
            job.gets += 1
            if self._log_streams or not self.status_waits_for_log:
                job.position += 1
            return 200, {**job.body, "status": current}

    def delete(self, name: str, query: dict) -> tuple[int, dict]:
        with self._lock:
            self.deleted.append((name, query))
            job = self.jobs.get(name)
            if job is None:
                return 404, _status_body(
                    404, "NotFound", f'{self.job_kind.plural} "{name}" not found'
                )
            job.deleting = True
            self._released.set()
            return 200, _status_body(200, "", "", status="Success")

    def log_lines(self, pod: str, query: dict) -> tuple[int, dict | list[str]]:
        with self._lock:
            if self.log_unavailable > 0:
                self.log_unavailable -= 1
                message = (
                    f'container "pytorch" in pod "{pod}" is waiting to start: ContainerCreating'
                )
                return 400, _status_body(400, "BadRequest", message)
            runs = self.logs.get(pod)
            if runs is None:
                return 404, _status_body(404, "NotFound", f'pods "{pod}" not found')
            run = self._log_runs.get(pod, 0)
            order = self._run_order.setdefault((pod, run), len(self._run_order))
            self._log_streams += 1
            lines = list(enumerate(runs[run]))
            if self._log_streams == 1 and self.drop_first_stream_after is not None:
                lines = lines[: self.drop_first_stream_after]
            elif run < len(runs) - 1:
                self._log_runs[pod] = run + 1  # this container ends; the next one starts
        since = query.get("sinceSeconds")
        oldest = time.time() - int(since[0]) if since else 0.0
        stamped = _flag(query, "timestamps")
        out = []
        for index, text in lines:
            when = self._timestamp(order, index)
            if when >= oldest:
                out.append(f"{_rfc3339_nano(when)} {text}" if stamped else text)
        return 200, out

    def pod_list(self, query: dict) -> dict:
        selector = dict(
            term.split("=", 1) for term in query.get("labelSelector", [""])[0].split(",") if term
        )
        with self._lock:
            items = [
                pod
                for pod in self.pods.values()
                if selector.items() <= pod["metadata"].get("labels", {}).items()
            ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def wait_released(self) -> None:
        self._released.wait()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: KubernetesStub

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        stub = self.stub
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        stub.requests.append((method, parts.path, query))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null") if length else None
        segments = parts.path.strip("/").split("/")
        rule = stub.rule(method, parts.path)
        if rule in stub.forbidden:
            group, resource, verb = rule
            message = (
                f"{resource}{'.' + group if group else ''} is forbidden: User "
                '"system:serviceaccount:megasft:default-editor" cannot '
                f'{verb} resource "{resource}" in API group "{group}" in the namespace '
                f'"{segments[3]}"'
            )
            return self._answer(403, _status_body(403, "Forbidden", message))
        # apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME], api/v1/namespaces/NS/pods[/POD/log]
        if parts.path.startswith(stub.jobs_prefix) and segments[5:6] == [stub.job_kind.plural]:
            name = segments[6] if len(segments) > 6 else None
            if method == "POST" and name is None:
                return self._answer(*stub.create(body))
            if method == "GET" and name:
                self._answer(*stub.get(name))
                if stub.on_get is not None and name in stub.jobs:
                    stub.on_get(name, stub.jobs[name].gets)
                return None
            if method == "DELETE" and name:
                return self._answer(*stub.delete(name, {**query, **(body or {})}))
        if (
            parts.path.startswith(PODS_PREFIX)
            and segments[4:5] == ["pods"]
            and segments[6:] == ["log"]
            and method == "GET"
        ):
            return self._stream_log(segments[5], query)
        if parts.path.startswith(PODS_PREFIX) and segments[4:] == ["pods"] and method == "GET":
            return self._answer(200, stub.pod_list(query))
        stub.unexpected.append(f"{method} {self.path}")
        return self._answer(404, _status_body(404, "NotFound", "not served by the stub"))

    def _stream_log(self, pod: str, query: dict) -> None:
        code, lines = self.stub.log_lines(pod, query)
        if code != 200:
            return self._answer(code, lines)
        # The launcher may close the stream (it stopped following), as any client may.
        with suppress(BrokenPipeError, ConnectionResetError):
            self._send_log(lines, follow=_flag(query, "follow"))
        return None

    def _send_log(self, lines: list[str], follow: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, line in enumerate(lines):
            data = (line + "\n").encode()
            if index == 0:  # a line split over two chunks, as a stream may deliver it
                self._chunk(data[:5])
                data = data[5:]
            self._chunk(data)
        if self.stub.hold_log_open and follow:
            self.stub.wait_released()
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


def _flag(query: dict, name: str) -> bool:
    """A boolean query parameter, as the API server reads it (the Python client sends `True`)."""
    return query.get(name, ["false"])[0].lower() in ("true", "1", "t")


def _status_body(code: int, reason: str, message: str, status: str = "Failure") -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": status,
        "message": message,
        "reason": reason,
        "code": code,
    }


def _rfc3339_nano(when: float) -> str:
    """As the kubelet writes it: nanoseconds, trailing zeros trimmed."""
    seconds = int(when)
    nanos = round((when - seconds) * 1e6) * 1000  # microsecond steps, as the stub makes them
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"
