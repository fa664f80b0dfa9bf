"""``bench/server.py``'s ``ApiServer`` waits for *its own* server: a run beside it on the same
machine (two GPUs, one ``serve_bench`` each, 2026-12-01) had both servers on port 8321; one
never bound it, and its benchmark then measured the other's server. A real HTTP server on
127.0.0.1 stands in for the other one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tokenvm_vllm.bench.server import ApiServer, ServerError


@pytest.fixture
def other_server() -> Iterator[int]:
    """A server on a free port answering ``/health`` and ``/v1/models`` (model ``other``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"" if self.path == "/health" else json.dumps(
                {"data": [{"id": "other"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()


def waiting_for(model: str, port: int, log: Path) -> ApiServer:
    """An ``ApiServer`` whose own process never binds ``port`` (it only sleeps)."""
    server = ApiServer.__new__(ApiServer)
    server.model, server.port, server.url, server.log = (
        model, port, f"http://127.0.0.1:{port}", log)
    log.write_text("this server never bound its port\n")
    server.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return server


def test_another_server_on_the_port_is_refused(other_server: int, tmp_path: Path) -> None:
    server = waiting_for("/models/mine", other_server, tmp_path / "mine.log")
    try:
        with pytest.raises(ServerError, match=r"answered by another server \(serving "
                                              r"\['other'\], not /models/mine\)"):
            server.wait_healthy(10)
    finally:
        server.proc.kill()


def test_its_own_server_passes(other_server: int, tmp_path: Path) -> None:
    server = waiting_for("other", other_server, tmp_path / "other.log")
    try:
        assert 0 <= server.wait_healthy(10) < 5
    finally:
        server.proc.kill()


def test_a_port_in_use_is_refused_before_starting(other_server: int, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match=f"port {other_server} on 127.0.0.1 is in use"):
        ApiServer("m", [], tmp_path / "x.log", port=other_server)


def test_cpu_seconds_are_summed_by_process_name_over_the_process_group() -> None:
    """A process group like a server's: a sleeping parent and a busy child that names itself
    (as vLLM names ``VLLM::EngineCore``). The child's CPU time is found under its name, and a
    process outside the group is not counted."""
    from tokenvm_vllm.bench.server import process_cpu_seconds

    child = ("import time; open('/proc/self/comm', 'w').write('busychild'); "
             "end = time.process_time() + 0.6\n"
             "while time.process_time() < end: pass\n"
             "time.sleep(30)")
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]);"
              " time.sleep(30)")
    group = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        used: dict[str, float] = {}
        deadline = time.monotonic() + 20
        while used.get("busychild", 0.0) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.2)
            used = process_cpu_seconds(group.pid)
        assert used.get("busychild", 0.0) >= 0.5
        assert used["busychild"] < 5.0  # (it stops spinning after 0.6 s of CPU)
        assert all(name != "busychild" for name in process_cpu_seconds(outsider.pid))
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait(timeout=10)
        outsider.kill()
        outsider.wait(timeout=10)
    deadline = time.monotonic() + 10  # (the killed child may take a moment to go)
    while process_cpu_seconds(group.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_cpu_seconds(group.pid) == {}  # a group with no live process left
