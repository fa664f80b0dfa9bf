"""Real Redis servers for tests: a standalone ``redis-server`` and a three-master cluster.

Everything listens on 127.0.0.1 only, on free loopback ports, with persistence off
(``--save "" --appendonly no``) and its files in a pytest tmp dir. ``DEBUG`` is enabled for local
connections so tests can make a server slow (``DEBUG SLEEP``). Servers are child processes of the
test run, stopped by the fixtures (``tests/tiers/remote/conftest.py``) and by ``stop()``.

The binaries come from Debian's ``redis-server`` / ``redis-tools`` (``ci/install_cpu.sh``
installs them). Without them the tests that need a server are skipped, unless
``TESTS_REQUIRE_REDIS=1`` (set by CI), which makes a missing binary a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"
"""The only address these servers ever bind or the tests ever talk to."""


def require_redis_binaries() -> None:
    """Skip (or, with TESTS_REQUIRE_REDIS=1, fail) when redis-server / redis-cli are missing."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if not missing:
        return
    msg = (f"{', '.join(missing)} not found: install Debian's redis-server package "
           f"(apt-get install -y redis-server), as ci/install_cpu.sh does")
    if os.environ.get("TESTS_REQUIRE_REDIS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(cluster: bool = False) -> int:
    """A loopback TCP port nobody listens on now (the server binds it right after). A cluster
    node also needs port + 10000 (its bus) free, so its port must be at most 55535."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if not cluster or (port <= 55535 and _port_free(port + 10000)):
            return port


class RedisServer:
    """One ``redis-server`` child process on ``127.0.0.1:port`` with its files in ``workdir``.

    ``extra``: more ``--option value`` arguments (e.g. ``["--requirepass", "pw"]``). ``start``
    waits until the server answers PING; ``stop`` is SIGTERM then SIGKILL; ``kill`` is SIGKILL
    (a crash). ``start`` after either brings it back on the same port, empty.
    """

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None,
                 password: str | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(cluster="--cluster-enabled" in (extra or []))
        self.password = password
        self.extra = list(extra or [])
        if password:
            self.extra += ["--requirepass", password]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def args(self) -> list[str]:
        return ["redis-server", "--bind", HOST, "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes",
                "--enable-debug-command", "local", "--logfile", str(self.workdir / "redis.log"),
                *self.extra]

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} exited: {log}")
            if self.cli("PING", check=False).strip() == "PONG":
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout_s}s")

    def cli(self, *command: str, check: bool = True, timeout_s: float = 10.0) -> str:
        """``redis-cli -h 127.0.0.1 -p port COMMAND...``; returns stdout."""
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not on the command line
        result = subprocess.run(["redis-cli", "-h", HOST, "-p", str(self.port), *command],
                                capture_output=True, text=True, timeout=timeout_s, env=env,
                                check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(command)}: {result.stderr.strip()}")
        return result.stdout

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server holds connections but answers nothing (a hung node)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class RedisCluster:
    """``masters`` cluster-enabled servers (each with ``replicas`` replicas) on loopback,
    joined with ``redis-cli --cluster create``. ``seeds`` is the client's seed list."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 0) -> None:
        self.nodes = [
            RedisServer(workdir / f"node-{i}", extra=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
                # Replicas sync at once (the default waits 5 s), so a failover keeps the data.
                "--repl-diskless-sync-delay", "0"])
            for i in range(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def seeds(self) -> str:
        return ",".join(f"{HOST}:{node.port}" for node in self.nodes)

    def start(self, timeout_s: float = 30.0) -> RedisCluster:
        """Start and join every node; on any failure the nodes already started are stopped."""
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"{HOST}:{node.port}" for node in self.nodes]
            self.nodes[0].cli("--cluster", "create", *addresses, "--cluster-replicas",
                              str(self.replicas), "--cluster-yes", timeout_s=timeout_s)
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node reports ``cluster_state:ok`` and sees every slot."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            infos = [n.cli("CLUSTER", "INFO", check=False) for n in live]
            synced = all("master_link_status:up" in n.cli("INFO", "replication", check=False)
                         for n in live if n not in self.masters())
            if synced and all("cluster_state:ok" in info and "cluster_slots_ok:16384" in info
                              for info in infos):
                return
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout_s}s")

    def masters(self) -> list[RedisServer]:
        out = []
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            if "role:master" in node.cli("INFO", "replication", check=False):
                out.append(node)
        return out

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
