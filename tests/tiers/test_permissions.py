"""Issue #11 item 8: the disk store's permission rules, checked as unprivileged users.

Everything else runs as root, which reads any file whatever its mode. Here each check runs in a
forked child that drops to an unused uid/gid (``setresuid``; no account is needed), so a 0600 file
or a 0700 directory really keeps the other user out. Two users: A owns the store, B attacks it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenvm_vllm.cli.doctor import doctor_checks
from tokenvm_vllm.tiers.disk import DiskStore, DiskStoreError
from tokenvm_vllm.tiers.disk.format import slot_stride

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to other uids needs root")

USER_A = 61001
USER_B = 61002
NS = bytes(range(16))
SLOT_BYTES = 8192
CAPACITY = 8 * slot_stride(SLOT_BYTES)
KEY = b"k" * 36
PAYLOAD = np.arange(SLOT_BYTES, dtype=np.uint8)


def as_user(uid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with uid and gid ``uid`` and no groups; return its result,
    or re-raise its exception as ``RuntimeError('Type: message')``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            data = pickle.dumps(("ok", fn()))
        except BaseException as exc:
            data = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
        except BaseException:
            status = 1
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise RuntimeError(value)
    return value


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can traverse, with a home of mode 0755 for each user."""
    root = Path(tempfile.mkdtemp(prefix="tokenvm-perm-", dir="/tmp"))
    try:
        root.chmod(0o755)
        for name, uid in (("a", USER_A), ("b", USER_B)):
            (root / name).mkdir(mode=0o755)
            os.chown(root / name, uid, uid)
        yield root
    finally:
        shutil.rmtree(root)


def make_store(path: Path) -> None:
    with DiskStore(str(path), CAPACITY, SLOT_BYTES, NS) as store:
        assert store.write(0, KEY, PAYLOAD).result()


def attempt(action: Callable[[], Any]) -> str:
    """'allowed', or the error's class name."""
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "allowed"


def test_another_user_cannot_read_list_or_replace_slot_files(base):
    store = base / "a" / "disk"
    as_user(USER_A, lambda: make_store(store))
    evil = base / "b" / "evil.bin"

    def attack() -> dict[str, str]:
        evil.write_bytes(b"\0" * slot_stride(SLOT_BYTES))
        return {
            "read": attempt(lambda: (store / "slots-0.bin").read_bytes()),
            "list": attempt(lambda: os.listdir(store)),
            "replace": attempt(lambda: os.replace(evil, store / "slots-0.bin")),
            "unlink": attempt(lambda: os.unlink(store / "slots-0.bin")),
            "write": attempt(lambda: (store / "slots-0.bin").write_bytes(b"x")),
        }

    assert as_user(USER_B, attack) == {action: "PermissionError" for action in
                                       ("read", "list", "replace", "unlink", "write")}

    def read_back() -> bool:
        with DiskStore(str(store), CAPACITY, SLOT_BYTES, NS) as again:
            out = np.zeros(SLOT_BYTES, np.uint8)
            return again.scan() == {KEY: 0} and again.read(0, KEY, out).result() and bool(
                np.array_equal(out, PAYLOAD))

    assert as_user(USER_A, read_back)


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o777])
def test_a_store_directory_owned_by_another_user_is_refused(base, mode):
    foreign = base / "b" / "disk"
    as_user(USER_B, lambda: foreign.mkdir(mode=mode))
    foreign.chmod(mode)  # mkdir applies the umask

    def try_open() -> str:
        try:
            DiskStore(str(foreign), CAPACITY, SLOT_BYTES, NS).close()
        except DiskStoreError as exc:
            return str(exc)
        return "opened"

    message = as_user(USER_A, try_open)
    assert "opened" != message
    if mode != 0o700:  # 0700: A cannot even look inside, but the owner check comes first
        assert not os.listdir(foreign)  # nothing was created in B's directory
    assert f"owned by uid {USER_B}" in message and str(foreign) in message
    lines = as_user(USER_A, lambda: [c.line() for c in doctor_checks(str(foreign), environ={})
                                     if c.name == "disk permissions"])
    assert len(lines) == 1 and lines[0].startswith("FAIL") and f"uid {USER_B}" in lines[0]


def test_a_symlinked_store_directory_into_another_users_dir_is_refused(base):
    target = base / "b" / "disk"
    as_user(USER_B, lambda: target.mkdir(mode=0o700))
    link = base / "a" / "disk"
    as_user(USER_A, lambda: os.symlink(target, link))

    def try_open() -> str:
        try:
            DiskStore(str(link), CAPACITY, SLOT_BYTES, NS).close()
        except DiskStoreError as exc:
            return str(exc)
        return "opened"

    assert f"owned by uid {USER_B}" in as_user(USER_A, try_open)


@pytest.mark.parametrize("name", ["slots-0.bin", "lock"])
def test_symlinks_inside_the_store_are_not_followed(base, name):
    store = base / "a" / "disk"
    victim = base / "a" / "victim.txt"

    def plant_and_open() -> str:
        store.mkdir(mode=0o700)
        victim.write_text("precious")
        os.symlink(victim, store / name)
        try:
            DiskStore(str(store), CAPACITY, SLOT_BYTES, NS).close()
        except DiskStoreError as exc:
            return str(exc)
        return "opened"

    message = as_user(USER_A, plant_and_open)
    assert message != "opened" and name in message
    assert victim.read_text() == "precious" and victim.stat().st_size == len("precious")
    assert (store / name).is_symlink()  # left as found, not replaced or followed
