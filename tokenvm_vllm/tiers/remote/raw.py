"""``RawRedis``: the remote tier's fast path to one standalone Redis (plain or TLS), on raw
sockets speaking RESP2, for the store's batch operations only.

Why not redis-py: its reply path copies every value several times (64 KiB ``recv`` chunks into
hiredis's buffer, then a ``bytes`` object, then our copy into the host-pool row), and a put
builds one concatenated ``bytes`` of header and payload. At 1 MiB blocks that held the tier to
a quarter of what ``redis-benchmark`` gets from the same server. Here:

* ``get_into`` sends one pipeline of ``GET`` s. On a plain socket each bulk reply of the
  expected size is received by scatter reads (``recvmsg_into``) straight into a 4 KiB header
  buffer and the caller's row, each read also taking the CRLF and the next reply's line into
  the small read buffer (``_Conn.read_views``): no payload byte passes through that buffer and
  one system call per value suffices when the data is there. Then the header is checked
  (namespace, rank, key, length) and the payload's checksum verified in place. Under TLS the
  header is read and checked first and a failing value's payload skipped.
* ``set_many`` sends ``SET key value PX ttl`` for a whole batch as a list of buffers
  (``sendmsg``; ``sendall`` piece by piece under TLS): the payload is never copied in Python.
* Plain sockets are blocking with the kernel's send/receive timeouts (``_kernel_timeouts``),
  so no ``recv`` or ``send`` is preceded by a ``poll``; an idle connection is checked with one
  non-blocking ``MSG_PEEK``.

Errors follow redis-py's classes so ``RemoteStore._run`` handles both clients alike: a socket
timeout is ``redis.TimeoutError``, a closed, reset or refused connection
``redis.ConnectionError``, refused credentials ``redis.AuthenticationError``, an error reply in a
batch is returned in its place (``redis.OutOfMemoryError`` for ``OOM``, else
``redis.ResponseError``). A connection that failed mid-batch is closed, never reused (its
stream position is unknown). Connections are pooled, one per concurrent caller; ``close``
closes idle ones and shuts down busy ones, so a thread blocked in ``recv`` wakes with an error.

Server error texts never contain the password; the password itself is only ever sent.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from tokenvm_vllm.tiers.remote.url import RemoteTarget

_CHUNK = 1 << 16
"""Bytes asked of each buffered ``recv`` (reply lines and small replies)."""
_LOOKAHEAD = 2 + 32
"""Bytes a scatter read takes past a value (``_Conn.read_views``): its CRLF and the next
reply's line (``$<size>``: a few digits)."""
_IOV_MAX = 512
"""Buffers per ``sendmsg`` call (Linux allows 1024)."""
SOCKET_BUFFER = 4 << 20
"""``SO_RCVBUF`` / ``SO_SNDBUF`` asked for (the kernel caps them at ``net.core.*mem_max``):
room for a whole large value in flight, so a 1 MiB block moves in few ``recv`` calls and
few wake-ups of the server. 0 leaves the kernel's autotuning alone."""

_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
"""``recv`` flags of the idle-connection check (an int: combining the enum costs per call)."""

Reply = bytes | int | list[Any] | None | redis.RedisError


def _bulk(data: bytes | memoryview) -> list[bytes | memoryview]:
    return [b"$%d\r\n" % len(data), data, b"\r\n"]


def encode_command(*args: bytes | memoryview) -> list[bytes | memoryview]:
    """One RESP command as buffers (the arguments themselves are not copied)."""
    out: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
    for arg in args:
        out += _bulk(arg)
    return out


def _key_command(verb: bytes, name: bytes) -> bytes:
    """``verb name`` as one RESP buffer (a key is short: joining beats one buffer per part)."""
    return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(verb), verb, len(name), name)


def _error(text: str) -> redis.RedisError:
    if text.startswith("OOM"):
        return redis.OutOfMemoryError(text)
    if text.startswith(("WRONGPASS", "NOAUTH")) or "invalid password" in text:
        return redis.AuthenticationError(text)
    return redis.ResponseError(text)


class _Conn:
    """One socket and its read buffer. Not thread-safe: one user at a time (the pool's job)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(_CHUNK)
        self.start = 0
        self.end = 0
        self.can_sendmsg = not isinstance(sock, ssl.SSLSocket)

    # -- sending ---------------------------------------------------------------------------------

    def send(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Send every buffer, in order, without joining them. Each is ``bytes`` or a 1-D
        memoryview of format ``B`` (so ``len`` is its size in bytes: no per-buffer cast)."""
        if not self.can_sendmsg:
            small: list[bytes | memoryview] = []
            for piece in buffers:  # join the small pieces: one TLS record each otherwise
                if len(piece) < 8192:
                    small.append(piece)
                    continue
                if small:
                    self.sock.sendall(b"".join(small))
                    small = []
                self.sock.sendall(piece)
            if small:
                self.sock.sendall(b"".join(small))
            return
        i = 0
        while i < len(buffers):
            chunk = buffers[i:i + _IOV_MAX]
            sent = self.sock.sendmsg(chunk)
            for piece in chunk:  # skip what went out; the rest of a partial one goes next
                if sent >= len(piece):
                    sent -= len(piece)
                    i += 1
                    continue
                buffers = [memoryview(piece)[sent:], *buffers[i + 1:]]
                i = 0
                break

    # -- receiving -------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Read more into the buffer (compacting it first); EOF is a connection error."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            if self.start:
                self.buf[:self.end - self.start] = self.buf[self.start:self.end]
                self.end -= self.start
                self.start = 0
            else:  # a reply line longer than the buffer (a long error text): grow
                self.buf.extend(bytes(len(self.buf)))
        n = self.sock.recv_into(memoryview(self.buf)[self.end:])
        if n == 0:
            raise redis.ConnectionError("connection closed by the server")
        self.end += n

    def readline(self) -> bytes:
        """The next line without its CRLF."""
        while True:
            at = self.buf.find(b"\r\n", self.start, self.end)
            if at >= 0:
                line = bytes(self.buf[self.start:at])
                self.start = at + 2
                return line
            self._fill()

    def read_into(self, out: memoryview) -> None:
        """Exactly ``out.nbytes`` bytes: what is buffered first, then straight from the socket."""
        have = min(self.end - self.start, out.nbytes)
        if have:
            out[:have] = memoryview(self.buf)[self.start:self.start + have]
            self.start += have
        while have < out.nbytes:
            n = self.sock.recv_into(out[have:])
            if n == 0:
                raise redis.ConnectionError("connection closed by the server")
            have += n

    def read_views(self, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order with the stream's next bytes: what is buffered first, then
        straight from the socket by scatter reads (``recvmsg_into``), each of which also takes
        up to ``_LOOKAHEAD`` bytes past the views into the (then empty) buffer: the bulk's CRLF
        and the next reply's line, so the next value needs no ``recv`` of its own for them and
        none of its payload passes through the buffer. Plain sockets only (``can_sendmsg``:
        an ``SSLSocket`` has no ``recvmsg_into``)."""
        pending: list[memoryview] = []
        for view in views:
            have = min(self.end - self.start, view.nbytes)
            if have:
                view[:have] = memoryview(self.buf)[self.start:self.start + have]
                self.start += have
            if have < view.nbytes:
                pending.append(view[have:])
        if not pending:
            return
        self.start = self.end = 0  # every buffered byte went into the views
        tail = memoryview(self.buf)[:_LOOKAHEAD]
        while pending:
            n = self.sock.recvmsg_into([*pending, tail])[0]
            if n == 0:
                raise redis.ConnectionError("connection closed by the server")
            while pending and n >= pending[0].nbytes:
                n -= pending.pop(0).nbytes
            if pending:
                pending[0] = pending[0][n:]
            else:
                self.end = n  # what landed past the views

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes (a value failing its checks, a CRLF)."""
        scratch = memoryview(bytearray(min(n, 1 << 20))) if n > _CHUNK else None
        while n:
            buffered = min(self.end - self.start, n)
            if buffered:
                self.start += buffered
                n -= buffered
            elif scratch is not None:
                got = self.sock.recv_into(scratch[:min(n, scratch.nbytes)])
                if got == 0:
                    raise redis.ConnectionError("connection closed by the server")
                n -= got
            else:
                self._fill()

    def read_reply(self) -> Reply:
        """One whole reply (error replies returned, not raised)."""
        line = self.readline()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return _error(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = bytearray(n)
            self.read_into(memoryview(data))
            self.skip(2)
            return bytes(data)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read_reply() for _ in range(n)]
        raise redis.ConnectionError(f"unexpected reply from the server: {line[:40]!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


ValueCheck = Callable[[int, memoryview | None, memoryview | None], bool]


class RawRedis:
    """A pool of raw connections to ``target`` (standalone), each with AUTH / SELECT done as
    redis-py does for our URL forms. Methods block the calling thread (the store's I/O
    threads) and raise redis-py's error classes (module docstring)."""

    def __init__(self, target: RemoteTarget, timeout_s: float) -> None:
        if target.cluster:
            raise ValueError("tokenvm: RawRedis serves one standalone server, not a cluster")
        self.target = target
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()
        self._closed = False
        self._ssl = self._ssl_context() if target.tls else None

    def _ssl_context(self) -> ssl.SSLContext:
        options = dict(self.target.tls_options)
        context = ssl.create_default_context(cafile=options.get("ssl_ca_certs") or None)  # type: ignore[arg-type]
        context.check_hostname = bool(options.get("ssl_check_hostname", True))
        if options.get("ssl_certfile"):
            context.load_cert_chain(str(options["ssl_certfile"]),
                                    str(options.get("ssl_keyfile") or "") or None)
        return context

    def _connect(self) -> _Conn:
        host, port = self.target.nodes[0]
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout_s)
            if SOCKET_BUFFER:  # Linux sizes the window scale from tcp_rmem's max, not this
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except TimeoutError as err:
            raise redis.TimeoutError(f"connecting to {host}:{port}: {err}") from err
        except OSError as err:
            raise redis.ConnectionError(f"connecting to {host}:{port}: {err}") from err
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
            conn = _Conn(sock)
            commands: list[list[bytes | memoryview]] = []
            if self.target.password is not None:
                auth = [self.target.password.encode()]
                if self.target.username:
                    auth.insert(0, self.target.username.encode())
                commands.append(encode_command(b"AUTH", *auth))
            if self.target.db:
                commands.append(encode_command(b"SELECT", str(self.target.db).encode()))
            commands.append(encode_command(b"PING"))
            conn.send([piece for command in commands for piece in command])
            for _ in commands:
                reply = conn.read_reply()
                if isinstance(reply, redis.RedisError):
                    raise reply
            if self._ssl is None:
                _kernel_timeouts(sock, self.timeout_s)
        except BaseException as err:
            sock.close()
            raise _converted(err) from err
        return conn

    def _pop_idle(self) -> _Conn | None:
        """An idle connection the server has not closed, or None (then a new one is made).

        An idle connection has nothing to read; if it is readable the server closed it (its
        ``timeout`` setting, a restart, ``CLIENT KILL``, a proxy's idle limit) or sent
        something unasked: it is dropped here, as redis-py's pool does, rather than failing
        the next batch and taking the tier down for a retry interval."""
        while True:
            with self._lock:
                if self._closed:
                    raise redis.ConnectionError("client closed")
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if conn.start == conn.end and _nothing_to_read(conn):
                return conn
            conn.close()

    def _take(self) -> _Conn:
        conn = self._pop_idle() or self._connect()
        with self._lock:
            closed = self._closed  # close() may have run while this one connected
            if not closed:
                self._busy.add(conn)
        if closed:
            conn.close()
            raise redis.ConnectionError("client closed")
        return conn

    def _give(self, conn: _Conn, healthy: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
            if healthy and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _batch(self, commands: Sequence[bytes | memoryview],
               read: Callable[[_Conn], Any]) -> Any:
        """Send ``commands`` on a pooled connection and ``read`` the replies."""
        conn = self._take()
        healthy = False
        try:
            conn.send(commands)
            result = read(conn)
            healthy = True
            return result
        except BaseException as err:
            raise _converted(err) from err
        finally:
            self._give(conn, healthy)

    # -- operations ------------------------------------------------------------------------------

    def ping(self) -> None:
        self._batch(encode_command(b"PING"), lambda conn: conn.read_reply())

    def exists_many(self, names: Sequence[bytes]) -> list[bool]:
        commands = [_key_command(b"EXISTS", name) for name in names]
        replies: list[Reply] = self._batch(commands, lambda conn: [
            conn.read_reply() for _ in names])
        return [isinstance(r, int) and r > 0 for r in replies]

    def delete_many(self, names: Sequence[bytes]) -> list[bool]:
        commands = [_key_command(b"DEL", name) for name in names]
        replies: list[Reply] = self._batch(commands, lambda conn: [
            conn.read_reply() for _ in names])
        return [reply == 1 for reply in replies]

    def set_many(self, names: Sequence[bytes], values: Sequence[Sequence[bytes | memoryview]],
                 px: int) -> list[bool | redis.RedisError]:
        """``SET name value PX px`` each; ``values[i]``: the value as buffers (e.g. header,
        padding, payload: ``bytes`` or 1-D byte memoryviews), sent as they are. True or the
        error reply, per name."""
        tail = b"\r\n$2\r\nPX\r\n$%d\r\n%d\r\n" % (len(str(px)), px)
        commands: list[bytes | memoryview] = []
        for name, parts in zip(names, values, strict=True):
            size = sum(len(part) for part in parts)
            head = b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(name), name, size)
            first, *rest = parts
            if len(first) < 1024:  # a short header: one buffer with the command's head
                commands += [head + first, *rest, tail]
            else:
                commands += [head, first, *rest, tail]

        def read(conn: _Conn) -> list[bool | redis.RedisError]:
            out: list[bool | redis.RedisError] = []
            for _ in names:
                reply = conn.read_reply()
                out.append(reply if isinstance(reply, redis.RedisError) else reply == b"OK")
            return out

        return self._batch(commands, read)  # type: ignore[no-any-return]

    def get_into(self, names: Sequence[bytes], header: memoryview,
                 outs: Sequence[memoryview], check: ValueCheck) -> list[bool | None]:
        """``GET`` each name, each value read as ``header`` (its bytes) then ``outs[i]``.

        ``check(i, header_or_None, out_or_None)`` is called twice per value of the expected size
        (``header.nbytes + outs[i].nbytes``): with ``header`` holding the value's header
        (``out`` None; valid during the call only, the next value reuses it) before the payload
        is read, and, if that passed, with ``out`` (header None) once it holds the payload. Per
        name: True (both checks passed), None (no such key, or an error reply), False (a value
        of another size or one failing a check: ``outs[i]`` may hold its bytes)."""
        commands = [_key_command(b"GET", name) for name in names]

        def read(conn: _Conn) -> list[bool | None]:
            out: list[bool | None] = []
            for i, view in enumerate(outs):
                line = conn.readline()
                if line[:1] == b"-":
                    out.append(None)
                    continue
                if line[:1] != b"$":
                    raise redis.ConnectionError(f"unexpected reply to GET: {line[:40]!r}")
                size = int(line[1:])
                if size < 0:
                    out.append(None)
                    continue
                if size != header.nbytes + view.nbytes:
                    conn.skip(size + 2)
                    out.append(False)
                    continue
                if conn.can_sendmsg:  # header and payload in one scatter read
                    conn.read_views((header, view))
                    conn.skip(2)
                    out.append(check(i, header, None) and check(i, None, view))
                    continue
                conn.read_into(header)
                if not check(i, header, None):
                    conn.skip(view.nbytes + 2)
                    out.append(False)
                    continue
                conn.read_into(view)
                conn.skip(2)
                out.append(check(i, None, view))
            return out

        return self._batch(commands, read)  # type: ignore[no-any-return]

    def scan_iter(self, match: str, count: int = 1000) -> Iterator[bytes]:
        """Keys matching ``match`` (SCAN; blocking, for tools)."""
        cursor = b"0"
        while True:
            reply = self._batch(encode_command(b"SCAN", cursor, b"MATCH", match.encode(),
                                               b"COUNT", str(count).encode()),
                                lambda conn: conn.read_reply())
            if isinstance(reply, redis.RedisError):
                raise reply
            cursor, names = reply
            yield from names
            if cursor == b"0":
                return

    def close(self) -> None:
        """Close every connection; one in use is shut down so its reader fails at once."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for conn in idle:
            conn.close()
        for conn in busy:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Make a plain TCP socket blocking with the kernel's ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` as
    its deadline per call. Python's own socket timeout ``poll`` s before every ``recv`` and
    ``send`` (one more system call each); a kernel timeout fails the call itself with
    ``EAGAIN`` (``BlockingIOError``, which ``_converted`` makes ``redis.TimeoutError``).
    Not for TLS: an ``SSLSocket`` turns ``EAGAIN`` into ``SSLWantReadError``."""
    seconds = max(timeout_s, 1e-3)
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _nothing_to_read(conn: _Conn) -> bool:
    """Whether an idle connection's socket has nothing to read (an open connection the server
    sent nothing unasked). One non-blocking peek on a plain socket; ``select`` under TLS (an
    ``SSLSocket`` takes no ``recv`` flags)."""
    if conn.can_sendmsg:
        try:
            conn.sock.recv(1, _PEEK_NOW)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # b"" (closed) or bytes nobody asked for
    try:
        return not select.select([conn.sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def _converted(err: BaseException) -> BaseException:
    """``err`` as the redis-py error class ``RemoteStore._run`` expects (``BlockingIOError``:
    a kernel socket timeout, ``_kernel_timeouts``)."""
    if isinstance(err, redis.RedisError):
        return err
    if isinstance(err, (TimeoutError, socket.timeout, BlockingIOError)):
        return redis.TimeoutError(f"timed out: {err}")
    if isinstance(err, ssl.SSLError):
        return redis.ConnectionError(f"TLS: {err}")
    if isinstance(err, OSError):
        return redis.ConnectionError(str(err))
    return err
