"""``bench/remote_gil.py`` against a real redis-server on 127.0.0.1: every row is measured, the
store really wrote, and nothing is left on the server."""

from __future__ import annotations

import json
from pathlib import Path

from tests.redis_servers import RedisServer
from tokenvm_vllm.bench import remote_gil


def test_rows_for_each_thread_count_and_the_server_is_left_empty(
        redis_server: RedisServer, tmp_path: Path) -> None:
    out = tmp_path / "gil.json"
    remote_gil.main([redis_server.url, "--block-bytes", str(64 << 10), "--threads", "1,2",
                     "--seconds", "0.2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["alone_op_us"] > 0 and result["block_bytes"] == 64 << 10
    assert [(row["process"], row["threads"]) for row in result["store"]] == [
        (False, 1), (False, 2), (True, 1), (True, 2)]
    for row in result["store"]:
        assert row["written_gb_s"] > 0 and row["op_us"] > 0
        assert abs(row["x_alone"] - row["op_us"] / result["alone_op_us"]) < 1e-9
    assert "redis_benchmark" in result  # the Debian package ships it beside the server
    assert int(redis_server.cli("DBSIZE")) == 0  # our keys and redis-benchmark's are gone
