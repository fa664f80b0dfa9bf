"""remote_url parsing and masking, the key format and the value format (no server needed)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tokenvm_vllm.keys import make_block_key
from tokenvm_vllm.tiers.disk.format import CHECKSUMS, DEFAULT_CSUM
from tokenvm_vllm.tiers.remote.keys import remote_key
from tokenvm_vllm.tiers.remote.url import mask_url, parse_remote_url
from tokenvm_vllm.tiers.remote.value import (
    HEADER_BYTES,
    HeaderCheck,
    check_header,
    check_value,
    decode_into,
    encode_value,
    encode_value_iov,
)

NS = bytes(range(16))
KEY = make_block_key(b"\x01" * 32)


def test_standalone_url_with_user_password_db_and_tls() -> None:
    target = parse_remote_url("rediss://alice:s%40cret@10.0.0.5:6380/3")
    assert target.nodes == (("10.0.0.5", 6380),) and not target.cluster and target.tls
    assert (target.username, target.password, target.db) == ("alice", "s@cret", 3)
    assert "s@cret" not in repr(target) and "s%40cret" not in target.describe()
    assert target.describe() == "rediss://alice:***@10.0.0.5:6380/3"


def test_cluster_seed_list_and_flag() -> None:
    seeds = parse_remote_url("redis://:pw@127.0.0.1:7000,127.0.0.1:7001")
    assert seeds.cluster and seeds.nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001))
    assert seeds.password == "pw" and seeds.username is None
    assert parse_remote_url("redis://127.0.0.1:7000?cluster=1").cluster
    assert parse_remote_url("redis://pw@127.0.0.1:7000").password == "pw"


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:6379", "is not a Redis URL"),
    ("redis://127.0.0.1", "is not host:port"),
    ("redis://127.0.0.1:99999", "is not host:port"),
    ("redis://:topsecret@127.0.0.1:1,127.0.0.1:2/4", "only db 0"),
])
def test_bad_urls_are_one_line_without_the_password(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        parse_remote_url(url)
    assert "topsecret" not in str(info.value) and "\n" not in str(info.value)


def test_tls_options_from_the_query() -> None:
    target = parse_remote_url("rediss://h:1/0?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false")
    assert dict(target.tls_options) == {"ssl_ca_certs": "/etc/ca.pem",
                                        "ssl_check_hostname": False}
    with pytest.raises(ValueError, match="without TLS"):
        parse_remote_url("redis://h:1/0?ssl_ca_certs=/etc/ca.pem")
    with pytest.raises(ValueError, match="unknown option 'sslmode'"):
        parse_remote_url("rediss://h:1/0?sslmode=x")


def test_mask_url() -> None:
    assert mask_url("redis://u:p4ss@h:1/0") == "redis://u:***@h:1/0"
    assert mask_url("rediss://p4ss@h:1") == "rediss://***@h:1"
    assert mask_url("redis://h:1") == "redis://h:1"


def test_key_names_prefix_namespace_rank_and_block() -> None:
    name = remote_key("prod", NS, 3, KEY)
    assert name == f"prod:{NS.hex()}:r3:{KEY.hex()}".encode()
    assert remote_key("prod", NS, 2, KEY) != name
    assert remote_key("stage", NS, 3, KEY) != name
    assert remote_key("prod", bytes(16), 3, KEY) != name


def test_value_round_trip_and_every_check() -> None:
    payload = np.arange(1000, dtype=np.uint8)
    value = encode_value(NS, 0, KEY, payload)
    assert len(value) == HEADER_BYTES + payload.nbytes
    out = np.zeros_like(payload)
    assert decode_into(value, NS, 0, KEY, out) and np.array_equal(out, payload)
    other_key = make_block_key(b"\x02" * 32)
    assert check_value(value, bytes(16), 0, KEY, 1000) is None  # another namespace
    assert check_value(value, NS, 1, KEY, 1000) is None  # another rank
    assert check_value(value, NS, 0, other_key, 1000) is None  # another block
    assert check_value(value, NS, 0, KEY, 999) is None  # another size
    assert check_value(value[:-1], NS, 0, KEY, 1000) is None  # truncated
    flipped = bytearray(value)
    flipped[-1] ^= 1
    assert check_value(bytes(flipped), NS, 0, KEY, 1000) is None  # payload bit rot
    flipped = bytearray(value)
    flipped[20] ^= 1
    assert check_value(bytes(flipped), NS, 0, KEY, 1000) is None  # header bit rot
    out[:] = 7
    assert not decode_into(bytes(flipped), NS, 0, KEY, out) and (out == 7).all()


def test_value_as_buffers_is_the_same_value() -> None:
    payload = np.arange(1000, dtype=np.uint8)
    parts = encode_value_iov(NS, 0, KEY, payload)
    value = b"".join(parts)
    assert len(value) == HEADER_BYTES + payload.nbytes
    assert value[HEADER_BYTES:] == payload.tobytes()
    assert (value[len(parts[0]):HEADER_BYTES] == bytes(HEADER_BYTES - len(parts[0])))
    out = np.zeros_like(payload)
    assert decode_into(value, NS, 0, KEY, out) and np.array_equal(out, payload)


def test_header_check_rejects_every_bit_flip_and_agrees_with_check_header() -> None:
    """The fast header check (``HeaderCheck``) against the reference (``check_header``): the
    same answer for the valid header and for every single-bit flip in the encoded part
    (fixed fields, key, the header's own checksum), all of which are rejected; flips in the
    zero padding (covered by no checksum, as before) are accepted by both."""
    payload = np.arange(1000, dtype=np.uint8)
    header = b"".join(encode_value_iov(NS, 0, KEY, payload)[:2])
    fast = HeaderCheck(NS, 0, payload.nbytes)
    reference = check_header(header, NS, 0, KEY, payload.nbytes)
    assert reference is not None
    assert fast(memoryview(header), KEY) == (reference.algo, reference.payload_csum)
    assert fast(header, make_block_key(b"\x02" * 32)) is None  # another block
    assert HeaderCheck(NS, 1, payload.nbytes)(header, KEY) is None  # another rank
    assert HeaderCheck(NS, 0, 999)(header, KEY) is None  # another size
    assert HeaderCheck(bytes(16), 0, payload.nbytes)(header, KEY) is None  # another namespace
    encoded = len(encode_value_iov(NS, 0, KEY, payload)[0])
    for byte in [*range(encoded), encoded + 5, HEADER_BYTES - 1]:
        for bit in range(8):
            flipped = bytearray(header)
            flipped[byte] ^= 1 << bit
            expected = check_header(bytes(flipped), NS, 0, KEY, payload.nbytes)
            got = fast(memoryview(flipped), KEY)
            assert got == (None if expected is None else
                           (expected.algo, expected.payload_csum)), (byte, bit)
            assert (got is None) == (byte < encoded), (byte, bit)


def test_header_check_falls_back_to_the_reference_decoder() -> None:
    """A header ``check_header`` accepts but that differs from what this version writes (here
    the reserved byte set, checksum recomputed) is still accepted, through the fallback."""
    payload = np.arange(1000, dtype=np.uint8)
    encoded = bytearray(encode_value_iov(NS, 0, KEY, payload)[0])
    body = encoded[:-8]
    body[11] = 1  # the reserved byte after magic (8), version (2), algorithm (1)
    header = bytes(body) + struct.pack("<Q", CHECKSUMS[DEFAULT_CSUM](bytes(body)))
    header += bytes(HEADER_BYTES - len(header))
    reference = check_header(header, NS, 0, KEY, payload.nbytes)
    assert reference is not None
    assert HeaderCheck(NS, 0, payload.nbytes)(header, KEY) == (reference.algo,
                                                                reference.payload_csum)
