"""TLS (``rediss://`` with a CA bundle) and an ACL user, against a real redis-server on
127.0.0.1 with a throwaway CA made by ``openssl``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.redis_servers import HOST, RedisServer, free_port, require_redis_binaries
from tests.tiers.remote.test_store import SLOT, keys, make_store, payloads


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "server.pem")
    return {name: folder / f"{name}" for name in ("ca.pem", "server.pem", "server.key")}


@pytest.mark.parametrize("client", ["raw", "redis-py"])
def test_tls_with_acl_user(tmp_path: Path, client: str) -> None:
    require_redis_binaries()
    certs = make_certs(tmp_path)
    port = free_port()
    server = RedisServer(tmp_path / "tls", port=free_port(), extra=[
        "--tls-port", str(port), "--tls-cert-file", str(certs["server.pem"]),
        "--tls-key-file", str(certs["server.key"]), "--tls-ca-cert-file", str(certs["ca.pem"]),
        "--tls-auth-clients", "no"]).start()
    try:
        server.cli("ACL", "SETUSER", "tokenvm", "on", ">user-secret", "~tkv:*", "+@all")
        url = (f"rediss://tokenvm:user-secret@{HOST}:{port}/0"
               f"?ssl_ca_certs={certs['ca.pem']}")
        with make_store(url, key_prefix="tkv", client=client) as store:
            assert store.available and store.raw == (client == "raw")
            ks, data = keys(4), payloads(4)
            assert store.put(ks, data).result(5) == [True] * 4
            outs = [np.zeros(SLOT, np.uint8) for _ in ks]
            assert store.get(ks, outs).result(5) == [True] * 4
            assert np.array_equal(outs[3], data[3])
        # The ACL user may not touch keys outside its pattern: writes fail, no exception.
        with make_store(url, key_prefix="other", client=client) as store:
            assert store.put(keys(1), payloads(1)).result(5) == [False]
        # Without the CA the server's certificate is refused: served without the tier.
        with make_store(f"rediss://tokenvm:user-secret@{HOST}:{port}/0", client=client) as store:
            assert not store.available
    finally:
        server.stop()
