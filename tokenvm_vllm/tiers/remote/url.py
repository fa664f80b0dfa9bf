"""``remote_url``: where the remote tier's Redis is, and how to print it without its secrets.

Accepted forms (``rediss`` instead of ``redis`` for TLS)::

    redis://[user:password@]host:port[/db]                 one server (db 0 by default)
    redis://[user:password@]host1:port1,host2:port2,...    a Redis Cluster, by seed nodes
    redis://[user:password@]host:port?cluster=1           a Redis Cluster, by one seed node

A cluster has no databases (``/db`` must be absent or 0). Passwords may be percent-encoded.
With ``rediss``, the server certificate is verified against the system's CAs; query parameters
``ssl_ca_certs=PATH`` (another CA bundle), ``ssl_certfile=PATH`` and ``ssl_keyfile=PATH`` (a
client certificate) and ``ssl_check_hostname=false`` adjust that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

_URL = re.compile(r"^(?P<scheme>rediss?)://(?:(?P<auth>[^@/]*)@)?(?P<hosts>[^/?#]+)"
                  r"(?:/(?P<db>\d*))?(?:\?(?P<query>[^#]*))?$")


@dataclass(frozen=True)
class RemoteTarget:
    """A parsed ``remote_url``. ``repr`` never shows the password."""

    nodes: tuple[tuple[str, int], ...]
    cluster: bool
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls_options: tuple[tuple[str, str | bool], ...] = ()
    """redis-py ``ssl_*`` keyword arguments from the URL's query (``rediss`` only)."""

    def describe(self) -> str:
        """For logs: scheme, user, nodes, db; the password as ``***``."""
        scheme = "rediss" if self.tls else "redis"
        user = self.username or ""
        auth = f"{user}:***@" if self.password else (f"{user}@" if user else "")
        hosts = ",".join(f"{host}:{port}" for host, port in self.nodes)
        kind = " (cluster)" if self.cluster else f"/{self.db}"
        return f"{scheme}://{auth}{hosts}{kind}"


def parse_remote_url(url: str) -> RemoteTarget:
    """Parse ``url``; raises ``ValueError`` with one line (the URL masked) on a bad one."""
    match = _URL.match(url.strip())
    shown = mask_url(url)
    if match is None:
        raise ValueError(
            f"tokenvm: remote_url={shown!r} is not a Redis URL: use "
            f"redis://[user:password@]host:port[/db], rediss:// for TLS, or "
            f"redis://host1:port1,host2:port2 for a cluster")
    user: str | None = None
    password: str | None = None
    if match["auth"]:
        user_part, sep, pass_part = match["auth"].partition(":")
        user = unquote(user_part) or None
        password = unquote(pass_part) if sep else None
        if not sep:  # redis://secret@host is Redis's own shorthand for a password alone
            user, password = None, unquote(user_part)
    nodes = []
    for hostport in match["hosts"].split(","):
        host, sep, port = hostport.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"tokenvm: remote_url={shown!r}: {hostport.strip()!r} is not host:port "
                f"(give every node with its port, e.g. 127.0.0.1:6379)")
        nodes.append((host.strip("[]"), int(port)))
    query = parse_qs(match["query"] or "")
    cluster = len(nodes) > 1 or query.get("cluster", ["0"])[0].lower() in ("1", "true", "yes")
    db = int(match["db"]) if match["db"] else 0
    tls_options: list[tuple[str, str | bool]] = []
    for name, values in query.items():
        if name == "cluster":
            continue
        if name not in _TLS_OPTIONS:
            raise ValueError(
                f"tokenvm: remote_url={shown!r} has unknown option {name!r}; known: cluster, "
                + ", ".join(sorted(_TLS_OPTIONS)))
        if match["scheme"] != "rediss":
            raise ValueError(f"tokenvm: remote_url={shown!r} sets {name} without TLS: use "
                             f"rediss://")
        value: str | bool = values[-1]
        if name == "ssl_check_hostname":
            value = str(value).lower() not in ("0", "false", "no")
        tls_options.append((name, value))
    if cluster and db:
        raise ValueError(f"tokenvm: remote_url={shown!r} names db {db}, but a Redis Cluster has "
                         f"only db 0: drop the /{db}")
    return RemoteTarget(nodes=tuple(nodes), cluster=cluster, tls=match["scheme"] == "rediss",
                        username=user, password=password, db=db, tls_options=tuple(tls_options))


_TLS_OPTIONS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs and error messages)."""
    return re.sub(r"^(\w+://)([^@/:]*:)?[^@/]*@",
                  lambda m: f"{m[1]}{m[2] or ''}***@", url.strip())
