"""A loopback HTTP server that speaks enough of MLflow's REST API and fails on cue
(500, 429 with Retry-After, 401, a reset connection, no answer): shared by the HTTP
sink tests and the fault matrix through the Trainer."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

__all__ = ["FaultServer", "Request"]


@dataclass
class Request:
    """One request the fault server received."""

    method: str
    path: str
    authorization: str | None
    body: Any
    time: float = field(default_factory=time.monotonic)


class FaultServer:
    """A threaded HTTP server on 127.0.0.1 that speaks enough of MLflow's REST API
    (under any path prefix, as Azure ML's is) and misbehaves on cue.

    ``fail(endpoint, *faults)`` queues faults for the next requests whose path ends with
    ``endpoint``: an int status, ``(status, headers)``, ``"reset"`` (the connection is
    reset without an answer) or ``"hang"`` (never answers). ``tls=(certfile, keyfile)``
    serves https instead of http. ``valid_tokens``, when set,
    makes every request without one of those bearer tokens a 401. Error bodies echo the
    request's Authorization header, to prove that clients scrub it.
    """

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.requests: list[Request] = []
        self.faults: dict[str, list[Any]] = {}
        self.valid_tokens: set[str] | None = None
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

            def do_GET(self) -> None:
                server._handle(self, None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                server._handle(self, json.loads(raw) if raw else None)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # resets and hangs end connections rudely on purpose

        self._httpd = Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            # ``tls=(certfile, keyfile)``: serve https with that certificate.
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail(self, endpoint: str, *faults: Any) -> None:
        with self._lock:
            self.faults.setdefault(endpoint, []).extend(faults)

    def count(self, endpoint: str) -> int:
        return sum(1 for r in self.requests if r.path.endswith(endpoint))

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        return self.runs[run_id]["metrics"]

    # -- the server side -----------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        parts = urlsplit(h.path)
        auth = h.headers.get("Authorization")
        with self._lock:
            self.requests.append(Request(h.command, parts.path, auth, body))
            fault = None
            for endpoint, queue in self.faults.items():
                if parts.path.endswith(endpoint) and queue:
                    fault = queue.pop(0)
                    break
        if fault == "reset":
            # SO_LINGER 0: close() sends RST, the client sees a reset connection.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if fault == "hang":
            self.release.wait(30)
            h.close_connection = True
            return
        if fault is not None:
            status, headers = (fault, {}) if isinstance(fault, int) else fault
            return self._send(h, status, {"error_code": "FAULT", "message": f"injected; you sent {auth}"}, headers)
        if self.valid_tokens is not None and (auth or "")[len("Bearer ") :] not in self.valid_tokens:
            return self._send(h, 401, {"error_code": "UNAUTHENTICATED", "message": f"bad credentials {auth}"})
        self._send(h, *self._mlflow(h.command, parts.path, parse_qs(parts.query), body or {}))

    def _mlflow(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> tuple[int, Any]:
        op = path.split("/api/2.0/mlflow/", 1)[-1]
        with self._lock:
            if op == "experiments/get-by-name":
                name = query["experiment_name"][0]
                if name not in self.experiments:
                    return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": name}
                return 200, {"experiment": {"experiment_id": self.experiments[name], "name": name}}
            if op == "experiments/create":
                self.experiments[body["name"]] = str(len(self.experiments) + 1)
                return 200, {"experiment_id": self.experiments[body["name"]]}
            if op == "runs/create":
                run_id = f"run{len(self.runs) + 1}"
                self.runs[run_id] = {
                    "experiment_id": body["experiment_id"],
                    "status": "RUNNING",
                    "metrics": [],
                    "params": {},
                    "tags": {t["key"]: t["value"] for t in body.get("tags", [])},
                }
                return 200, {"run": {"info": {"run_id": run_id, "status": "RUNNING"}}}
            if op == "runs/log-batch":
                run = self.runs[body["run_id"]]
                run["metrics"].extend(body.get("metrics", []))
                run["params"].update({p["key"]: p["value"] for p in body.get("params", [])})
                run["tags"].update({t["key"]: t["value"] for t in body.get("tags", [])})
                return 200, {}
            if op == "runs/update":
                self.runs[body["run_id"]]["status"] = body["status"]
                return 200, {}
            if op == "runs/get":
                if query["run_id"][0] not in self.runs:
                    return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"}
                run = self.runs[query["run_id"][0]]
                params = [{"key": k, "value": v} for k, v in run["params"].items()]
                return 200, {"run": {"info": {"run_id": query["run_id"][0]}, "data": {"params": params}}}
            if op == "echo":
                return 200, {"ok": True}
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": path}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


# Fixtures for the modules that talk to a FaultServer: import them by name
# (``from tests._faultserver import server, no_mlflow_env``) to use them there.


@pytest.fixture
def server() -> Iterator[FaultServer]:
    """A fresh fault server on 127.0.0.1, closed after the test."""
    s = FaultServer()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLFLOW_*/AZUREML_* variables from the machine reach the sinks under test."""
    for k in list(os.environ):
        if k.startswith(("MLFLOW_", "AZUREML_")):
            monkeypatch.delenv(k)
