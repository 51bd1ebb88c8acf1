"""The exit handler: the run's final status to the webhook, never a failure of its own."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from megasft.pipeline.steps import finish


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        _Receiver.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_final_status_is_posted_to_the_webhook():
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        report = finish(
            {},
            {"webhook": url},
            config_name="demo",
            kfp_run_id="run-7",
            state="FAILED",
            error_message="train failed",
        )
    finally:
        server.shutdown()
    assert report["webhook"] == "sent (204)"
    assert _Receiver.received == [
        {
            "pipeline": "megasft-sft",
            "config": "demo",
            "kfp_run_id": "run-7",
            "state": "FAILED",
            "error": "train failed",
        }
    ]


def test_an_unreachable_webhook_is_reported_not_raised(capsys):
    report = finish(
        {},
        {"webhook": "http://127.0.0.1:9/hook"},
        config_name="demo",
        kfp_run_id="r",
        state="SUCCEEDED",
    )
    assert report["webhook"].startswith("failed:")
    assert "webhook http://127.0.0.1:9/hook not notified" in capsys.readouterr().err
