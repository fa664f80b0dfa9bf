"""The raw-socket client (``raw.RawRedis``) on the edges of RESP framing: values split across
many ``recv`` calls, missing keys, values of the wrong size or failing their header check in the
middle of a pipeline, and a server gone mid-reply. Against a real redis-server on 127.0.0.1, with
a real TCP relay in between where the bytes' timing matters."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from tests.redis_servers import HOST, RedisServer
from tests.tiers.remote.test_store import NS, keys
from tokenvm_vllm.tiers.remote import raw
from tokenvm_vllm.tiers.remote.store import RemoteStore
from tokenvm_vllm.tiers.remote.url import parse_remote_url
from tokenvm_vllm.tiers.remote.value import HEADER_BYTES, encode_value

BIG = 1 << 20


class Relay:
    """A TCP relay on 127.0.0.1 to a real server. Server -> client bytes go out in random small
    pieces (``max_piece``) with a pause every few pieces, so the client's reads see them split
    at arbitrary points; ``cut_after`` closes the client's side after that many reply bytes (a
    server gone mid-reply)."""

    def __init__(self, port: int, max_piece: int = 3000, cut_after: int | None = None) -> None:
        self.target = port
        self.max_piece = max_piece
        self.cut_after = cut_after
        self.pieces = 0
        self.sent_total = 0
        """Reply bytes relayed so far (all connections)."""
        self.listener = socket.create_server((HOST, 0))
        self.port = int(self.listener.getsockname()[1])
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.target))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        rng = random.Random(7)
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if not replies:
                    dst.sendall(data)
                    continue
                while data:
                    piece = data[:rng.randint(1, self.max_piece)]
                    if self.cut_after is not None and sent + len(piece) > self.cut_after:
                        dst.sendall(piece[:self.cut_after - sent])
                        raise ConnectionAbortedError
                    dst.sendall(piece)
                    sent += len(piece)
                    self.sent_total += len(piece)
                    data = data[len(piece):]
                    self.pieces += 1
                    if self.pieces % 8 == 0:
                        time.sleep(0.0002)  # let the client drain: its reads end here
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def plain(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=redis_server.port)
    yield client
    client.close()


def big_payloads(n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, BIG, dtype=np.uint8) for _ in range(n)]


class _Counting:
    """A real socket whose ``recv_into`` and ``recvmsg_into`` calls are counted (everything
    else passes through)."""

    def __init__(self, inner: socket.socket, calls: list[int]) -> None:
        self.inner = inner
        self.calls = calls

    def recv_into(self, buf: memoryview, *args: int) -> int:
        self.calls.append(1)
        return self.inner.recv_into(buf, *args)

    def recvmsg_into(self, buffers: list[memoryview], *args: int) -> tuple[Any, ...]:
        self.calls.append(1)
        return self.inner.recvmsg_into(buffers, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_values_split_across_many_recv_calls(redis_server: RedisServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    init = raw._Conn.__init__

    def counting_init(conn: raw._Conn, sock: socket.socket) -> None:
        init(conn, _Counting(sock, calls))  # type: ignore[arg-type]

    monkeypatch.setattr(raw._Conn, "__init__", counting_init)
    relay = Relay(redis_server.port)
    try:
        with RemoteStore(f"redis://{HOST}:{relay.port}/0", NS, 0, BIG, timeout_s=5.0,
                         client="raw") as store:
            ks, data = keys(6, salt=40), big_payloads(6)
            assert store.put(ks, data).result(30) == [True] * 6
            calls.clear()
            outs = [np.zeros(BIG, np.uint8) for _ in ks]
            assert store.get(ks, outs).result(30) == [True] * 6
            assert all(np.array_equal(a, b) for a, b in zip(outs, data, strict=True))
    finally:
        relay.close()
    # 6 values of 1 MiB + 4 KiB in pieces of at most 3000 bytes, the relay pausing every 8
    # pieces: at least one read per pause, so hundreds per value.
    assert len(calls) > 6 * 40, len(calls)


def test_missing_keys_between_hits_keep_the_pipeline_aligned(redis_server: RedisServer) -> None:
    with RemoteStore(redis_server.url, NS, 0, BIG, timeout_s=5.0, client="raw") as store:
        present, absent = keys(3, salt=41), keys(3, salt=42)
        data = big_payloads(3)
        assert store.put(present, data).result(30) == [True] * 3
        order = [absent[0], present[0], absent[1], present[1], present[2], absent[2]]
        outs = [np.zeros(BIG, np.uint8) for _ in order]
        assert store.get(order, outs).result(30) == [False, True, False, True, True, False]
        assert np.array_equal(outs[1], data[0]) and np.array_equal(outs[4], data[2])
        stats = store.stats()
        assert stats["hit_blocks"] == 3 and stats["miss_blocks"] == 3
        assert stats["corrupt_blocks"] == 0  # a missing key is a plain miss, nothing deleted


def test_wrong_size_and_foreign_values_are_misses_deleted_mid_pipeline(
        redis_server: RedisServer, plain: redis.Redis) -> None:
    with RemoteStore(redis_server.url, NS, 0, BIG, timeout_s=5.0, client="raw") as store:
        ks = keys(6, salt=43)
        data = big_payloads(6)
        assert store.put(ks, data).result(30) == [True] * 6
        names = [store.key_of(k) for k in ks]
        plain.set(names[0], b"short")  # shorter than a header: skipped from the buffer
        plain.set(names[2], bytes(HEADER_BYTES + BIG + 1))  # one byte too long: skipped
        # The right size, but another block's value: its header fails before the payload.
        plain.set(names[4], encode_value(NS, 0, ks[5], data[5]))
        outs = [np.zeros(BIG, np.uint8) for _ in ks]
        assert store.get(ks, outs).result(30) == [False, True, False, True, False, True]
        for i in (1, 3, 5):
            assert np.array_equal(outs[i], data[i])
        assert [plain.exists(names[i]) for i in (0, 2, 4)] == [0, 0, 0]
        assert store.stats()["corrupt_blocks"] == 3
        # The connection is still in step: a second batch on it reads right.
        assert store.get(ks[1::2], outs[:3]).result(30) == [True] * 3


def test_payload_bit_rot_found_in_place(redis_server: RedisServer, plain: redis.Redis) -> None:
    with RemoteStore(redis_server.url, NS, 0, BIG, timeout_s=5.0, client="raw") as store:
        ks, data = keys(2, salt=44), big_payloads(2)
        assert store.put(ks, data).result(30) == [True] * 2
        plain.setrange(store.key_of(ks[0]), HEADER_BYTES + BIG - 1,
                       bytes([int(data[0][-1]) ^ 0xFF]))  # the payload's last byte flipped
        outs = [np.zeros(BIG, np.uint8) for _ in ks]
        assert store.get(ks, outs).result(30) == [False, True]
        assert plain.exists(store.key_of(ks[0])) == 0


@pytest.mark.parametrize("cut_after", [3, HEADER_BYTES // 2, HEADER_BYTES + BIG // 2,
                                       2 * (HEADER_BYTES + BIG) + 5])
def test_server_gone_mid_reply_is_a_miss_not_an_exception(redis_server: RedisServer,
                                                          cut_after: int) -> None:
    ks, data = keys(4, salt=45), big_payloads(4)
    with RemoteStore(redis_server.url, NS, 0, BIG, timeout_s=5.0, client="raw") as direct:
        assert direct.put(ks, data).result(30) == [True] * 4
    relay = Relay(redis_server.port, max_piece=1 << 16, cut_after=3 if cut_after == 3 else None)
    try:
        # cut_after=3 cuts the connect's PING reply (down at start-up); the others let the
        # connection come up and cut the GETs' replies that many bytes in.
        with RemoteStore(f"redis://{HOST}:{relay.port}/0", NS, 0, BIG, timeout_s=5.0,
                         retry_interval_s=60.0, client="raw") as store:
            if cut_after == 3:
                assert not store.available
                return
            relay.cut_after = relay.sent_total + cut_after
            outs = [np.zeros(BIG, np.uint8) for _ in ks]
            start = time.monotonic()
            result = store.get(ks, outs).result(30)
            assert result == [False] * 4
            assert time.monotonic() - start < 5.0  # the closed connection, not a timeout
            assert not store.available and store.outages == 1
    finally:
        relay.close()


def test_partial_sends_resume_mid_buffer() -> None:
    """``_Conn.send`` over a socket that takes a little at a time (a non-blocking socket with
    small buffers, a slow reader): every byte arrives once, in order, whatever the split."""
    left, right = socket.socketpair()
    for sock in (left, right):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    left.settimeout(5.0)  # Python's timeout mode: sendmsg returns after a partial write
    rng = np.random.default_rng(5)
    pieces: list[bytes | memoryview] = []
    for n in (3, 70_000, 1, 0, 9000, 200_000, 5):
        chunk = rng.integers(0, 256, n, dtype=np.uint8)
        pieces.append(chunk.tobytes() if n % 2 else memoryview(chunk))
    expected = b"".join(bytes(p) for p in pieces)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(expected):
            data = right.recv(rng_sizes.pop() if rng_sizes else 4096)
            if not data:
                return
            got.extend(data)
            time.sleep(0.0001)

    rng_sizes = [int(x) for x in rng.integers(1, 3000, 2000)]
    reader = threading.Thread(target=drain)
    reader.start()
    conn = raw._Conn(left)
    assert conn.can_sendmsg
    conn.send(pieces)
    reader.join(10)
    left.close()
    right.close()
    assert bytes(got) == expected


def test_kernel_timeout_is_a_redis_timeout(redis_server: RedisServer) -> None:
    """Plain connections wait with the kernel's SO_RCVTIMEO, not Python's socket timeout; a
    server that does not answer in time is ``redis.TimeoutError`` (a miss upstream), never a
    connection error (which would take the tier down)."""
    client = raw.RawRedis(parse_remote_url(redis_server.url), 0.3)
    try:
        client.ping()
        conn = client._idle[0]
        assert conn.sock.gettimeout() is None  # blocking: no poll() before each recv
        sleeper = threading.Thread(target=redis_server.cli, args=("DEBUG", "SLEEP", "1"))
        sleeper.start()
        time.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - start < 0.8
        sleeper.join()
        client.ping()  # a fresh connection replaces the one that timed out
    finally:
        client.close()


def test_scatter_read_keeps_what_follows_a_value_buffered() -> None:
    """``read_views`` fills header and payload straight from the socket and leaves the bytes
    it read past them (the CRLF, the next replies: a nil, a short value) in the buffer, where
    the following reads find them in order, whichever way the stream was split."""
    for split in (3, 7, 4096, 4100, 9000, 20000):
        left, right = socket.socketpair()
        left.settimeout(5.0)  # a byte lost by the reader fails the test instead of hanging
        conn = raw._Conn(left)
        header = memoryview(bytearray(4096))
        payload = memoryview(bytearray(10_000))
        value = bytes(range(256)) * 16 + bytes(reversed(range(256))) * 39 + b"x" * 16
        stream = b"$14096\r\n" + value + b"\r\n$-1\r\n$5\r\nhello\r\n-ERR no\r\n"

        def feed(data: bytes = stream, sock: socket.socket = right, step: int = split) -> None:
            for n, at in enumerate(range(0, len(data), step)):
                sock.sendall(data[at:at + step])
                if n % 64 == 0:
                    time.sleep(0.001)

        writer = threading.Thread(target=feed)
        writer.start()
        assert conn.readline() == b"$14096"
        conn.read_views((header, payload))
        assert bytes(header) + bytes(payload) == value, split
        conn.skip(2)
        assert conn.read_reply() is None
        assert conn.read_reply() == b"hello"
        assert isinstance(conn.read_reply(), redis.ResponseError)
        writer.join()
        left.close()
        right.close()
