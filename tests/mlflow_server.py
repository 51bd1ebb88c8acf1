"""A real `mlflow server` for the tracking tests, started once per test session.

    from tests.mlflow_server import mlflow_server  # noqa: F401  (the fixture)

    def test_something(mlflow_server):
        client = mlflow_server.client()   # MlflowClient on mlflow_server.uri

The server is an `mlflow server` subprocess with a sqlite backend and proxied artifacts in a
temporary directory, on a free port of 127.0.0.1. Starting it takes 10-20 s (two imports of
mlflow), so it is started once, by the first test that asks for it, and stopped when the session
ends, whichever modules import the fixture.

`TcpRelay` stands between a client and the server, so that a test can make the server vanish
(connections refused and reset) without stopping the shared one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_SECONDS = 120  # generous: two busy cores


@dataclass
class MlflowServer:
    uri: str
    root: Path
    process: subprocess.Popen

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def stop(self) -> None:
        """Stops the server and whatever it started (its own process group)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


_server: MlflowServer | None = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server() -> MlflowServer:
    """The session's server, started on first use."""
    global _server
    if _server is not None:
        return _server
    root = Path(tempfile.mkdtemp(prefix="megasft-mlflow-"))
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow) if mlflow.exists() else "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No job runner: it starts seven more processes that import mlflow, for features (prompt
    # optimization, scorers) these tests do not use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(root / "server.log", "wb")  # noqa: SIM115  (the server writes it until the end)
    process = subprocess.Popen(
        command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    server = MlflowServer(f"http://127.0.0.1:{port}", root, process)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            output = (root / "server.log").read_text(errors="replace")[-3000:]
            server.stop()
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"mlflow server did not answer within {STARTUP_SECONDS} s")
        time.sleep(0.2)
    atexit.register(server.stop)
    _server = server
    return server


@pytest.fixture(scope="session")
def mlflow_server() -> MlflowServer:
    return start_server()


class TcpRelay:
    """Forwards 127.0.0.1:<port> to a server, until `cut()`: then connections are refused and
    the open ones reset, as when the server's process dies."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        # shutdown, not just close: it also wakes the threads blocked in accept() and recv()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
