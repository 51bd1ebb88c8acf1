"""A stub of the Kubeflow Pipelines v2beta1 REST API for `megasft pipeline submit`'s tests: no cluster.

`KfpStub` is an `http.server` in a thread that answers the requests the real `kfp.Client`
makes while submitting, the way the KFP API server answers them, from in-memory state:

    GET  /apis/v2beta1/healthz                        {"multi_user": false}
    GET  /apis/v2beta1/pipelines?filter=&namespace=   pipelines, filtered by display_name and
                                                      namespace (none: the shared ones)
    POST /apis/v2beta1/pipelines/upload?name=...      multipart upload; like KFP, it also creates
                                                      the first version, named after the pipeline
    GET  /apis/v2beta1/pipelines/ID/versions?filter=  versions, filtered by display_name
    POST /apis/v2beta1/pipelines/upload_version?name=&pipelineid=
                                                      409 for a name the pipeline already has
    GET  /apis/v2beta1/experiments?filter=&namespace= experiments, by display_name and namespace
    POST /apis/v2beta1/experiments                    create
    POST /apis/v2beta1/runs                           create (state PENDING)
    GET  /apis/v2beta1/runs/ID                        each GET serves the next state of
                                                      `run_states`; the last one repeats

and, for the job summary's link, the two MLflow REST calls `submit` makes:

    GET  /api/2.0/mlflow/experiments/get-by-name      `mlflow_experiments`: name -> id
    POST /api/2.0/mlflow/runs/search                  `mlflow_runs`: kfp.run_id tag -> run id

With `token` set, every request must carry `Authorization: Bearer <token>` (else 401, as an
ingress or the API server's authorizer answers). Anything else is answered 404 and kept in
`unexpected`. It is not a KFP server: it checks no pipeline spec and runs nothing.
"""

from __future__ import annotations

import email.parser
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"
CREATED = "2025-01-01T00:00:00Z"


class KfpStub:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}  # pipeline id -> its versions, oldest first
        self.packages: dict[str, str] = {}  # version id -> the uploaded YAML
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.run_states: list[str] = ["PENDING"]
        self.run_error: str | None = None
        self.failed_task: tuple[str, str] | None = None  # (display name, error message)
        self.mlflow_experiments: dict[str, str] = {}
        self.mlflow_runs: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self._gets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> KfpStub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls(self, method: str, path: str) -> int:
        return self.requests.count((method, path))

    # -- the API ---------------------------------------------------------------------------

    def answer(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict]:
        with self._lock:
            self.requests.append((method, path))
            if (
                self.token
                and path.startswith(API)
                and headers.get("Authorization") != f"Bearer {self.token}"
            ):
                return 401, {"code": 16, "message": "Unauthenticated: no valid bearer token"}
            route = (method, path)
            if route == ("GET", f"{API}/healthz"):
                return 200, {"multi_user": False}
            if route == ("GET", f"{API}/pipelines"):
                namespace = query.get("namespace", [""])[0]  # none: the shared pipelines
                found = [
                    pipeline
                    for pipeline in _filtered(self.pipelines.values(), query)
                    if pipeline["namespace"] == namespace
                ]
                return 200, {"pipelines": found, "total_size": len(found)}
            if route == ("POST", f"{API}/pipelines/upload"):
                return self._upload(query, headers, body)
            if route == ("POST", f"{API}/pipelines/upload_version"):
                return self._upload_version(query, headers, body)
            if (
                method == "GET"
                and path.startswith(f"{API}/pipelines/")
                and path.endswith("/versions")
            ):
                pipeline_id = path.split("/")[4]
                if pipeline_id not in self.versions:
                    return 404, {"code": 5, "message": f"pipeline {pipeline_id} not found"}
                found = _filtered(self.versions[pipeline_id], query)
                return 200, {"pipeline_versions": found, "total_size": len(found)}
            if route == ("GET", f"{API}/experiments"):
                namespace = query.get("namespace", [""])[0]
                found = [
                    experiment
                    for experiment in _filtered(self.experiments.values(), query)
                    if experiment.get("namespace", "") == namespace
                ]
                return 200, {"experiments": found, "total_size": len(found)}
            if route == ("POST", f"{API}/experiments"):
                experiment = json.loads(body)
                experiment.update(experiment_id=str(uuid.uuid4()), created_at=CREATED)
                self.experiments[experiment["experiment_id"]] = experiment
                return 200, experiment
            if route == ("POST", f"{API}/runs"):
                run = json.loads(body)
                run.update(run_id=str(uuid.uuid4()), state="PENDING", created_at=CREATED)
                self.runs[run["run_id"]] = run
                return 200, run
            if method == "GET" and path.startswith(f"{API}/runs/"):
                return self._get_run(path.rsplit("/", 1)[1])
            if route == ("GET", "/api/2.0/mlflow/experiments/get-by-name"):
                name = query["experiment_name"][0]
                if name not in self.mlflow_experiments:
                    return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}
                return 200, {"experiment": {"experiment_id": self.mlflow_experiments[name]}}
            if route == ("POST", "/api/2.0/mlflow/runs/search"):
                wanted = json.loads(body)["filter"].split("'")[1]
                found = self.mlflow_runs.get(wanted)
                return 200, {"runs": [{"info": {"run_id": found}}]} if found else {}
            self.unexpected.append(route)
            return 404, {"code": 5, "message": f"no route {method} {path} in the stub"}

    def _upload(self, query: dict, headers, body: bytes) -> tuple[int, dict]:
        name = query["name"][0]
        namespace = query.get("namespace", [""])[0]
        if any(
            (pipeline["display_name"], pipeline["namespace"]) == (name, namespace)
            for pipeline in self.pipelines.values()
        ):
            return 409, {"code": 6, "message": f"pipeline {name} already exists"}
        pipeline_id = str(uuid.uuid4())
        pipeline = {
            "pipeline_id": pipeline_id,
            "name": name,
            "display_name": name,
            "description": query.get("description", [""])[0],
            "namespace": namespace,
            "created_at": CREATED,
        }
        self.pipelines[pipeline_id] = pipeline
        self.versions[pipeline_id] = []
        self._add_version(pipeline_id, name, _uploaded_file(headers, body))
        return 200, pipeline

    def _upload_version(self, query: dict, headers, body: bytes) -> tuple[int, dict]:
        pipeline_id, name = query["pipelineid"][0], query["name"][0]
        if pipeline_id not in self.versions:
            return 404, {"code": 5, "message": f"pipeline {pipeline_id} not found"}
        if any(version["display_name"] == name for version in self.versions[pipeline_id]):
            return 409, {"code": 6, "message": f"version {name} already exists"}
        return 200, self._add_version(pipeline_id, name, _uploaded_file(headers, body))

    def _add_version(self, pipeline_id: str, name: str, package: str) -> dict:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "name": name,
            "display_name": name,
            "created_at": CREATED,
        }
        self.versions[pipeline_id].append(version)
        self.packages[version["pipeline_version_id"]] = package
        return version

    def _get_run(self, run_id: str) -> tuple[int, dict]:
        if run_id not in self.runs:
            return 404, {"code": 5, "message": f"run {run_id} not found"}
        served = self._gets.get(run_id, 0)
        self._gets[run_id] = served + 1
        run = dict(self.runs[run_id], state=self.run_states[min(served, len(self.run_states) - 1)])
        if run["state"] == "FAILED":
            if self.run_error:
                run["error"] = {"code": 2, "message": self.run_error}
            if self.failed_task:
                task, message = self.failed_task
                run["run_details"] = {
                    "task_details": [
                        {"display_name": "validate", "state": "SUCCEEDED"},
                        {"display_name": task, "state": "FAILED", "error": {"message": message}},
                    ]
                }
        return 200, run


def _filtered(items, query: dict) -> list[dict]:
    """The items whose display_name equals the filter's (the only predicate submit sends)."""
    if "filter" not in query:
        return list(items)
    (predicate,) = json.loads(query["filter"][0])["predicates"]
    # kfp.Client sends the operation as its enum number (EQUALS = 1); protojson takes either.
    assert predicate["key"] == "display_name" and predicate["operation"] in (1, "EQUALS"), predicate
    wanted = predicate.get("stringValue", predicate.get("string_value"))
    return [item for item in items if item["display_name"] == wanted]


def _uploaded_file(headers, body: bytes) -> str:
    message = email.parser.BytesParser().parsebytes(
        f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
    )
    (part,) = [
        part
        for part in message.get_payload()
        if part.get_param("name", header="content-disposition") == "uploadfile"
    ]
    return part.get_payload(decode=True).decode()


def _handler(stub: KfpStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                status, payload = stub.answer(
                    self.command, url.path, parse_qs(url.query), self.headers, body
                )
            except Exception as error:  # noqa: BLE001 - a broken request fails the test, visibly
                stub.unexpected.append((self.command, f"{url.path}: {error!r}"))
                status, payload = 500, {"code": 13, "message": repr(error)}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

    return Handler
