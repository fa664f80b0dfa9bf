"""The host pool that tensor-parallel ranks share (MLA's latent KV stored once): two pools over
one file are one memory; the file system must have room for it; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenvm_vllm.config import TokenVMConfigError, load_config
from tokenvm_vllm.transfer.host_pool import HostPool


def test_two_pools_over_one_file_share_their_bytes(tmp_path: Path) -> None:
    path = str(tmp_path / "tokenvm-engine.pool")
    rank0 = HostPool(4, 4096, pin=False, shared_path=path)
    rank1 = HostPool(4, 4096, pin=False, shared_path=path, create=False)
    rank0.buffer[3, :8] = 5
    assert rank1.buffer[3, :8].tolist() == [5] * 8
    assert Path(path).stat().st_size == 4 * 4096  # one pool's bytes, not two
    private = HostPool(4, 4096, pin=False)
    assert private.buffer[3, :8].tolist() == [0] * 8


def test_a_pool_larger_than_its_file_system_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenVMConfigError) as err:
        HostPool(2**20, 2**30, pin=False, shared_path=str(tmp_path / "big.pool"))
    message = str(err.value)
    assert "needs 1125899906842624 bytes" in message and "mla_store_once=false" in message
    assert "\n" not in message
    assert not (tmp_path / "big.pool").exists()  # refused before anything was created


def test_mla_store_once_bad_value_names_the_key() -> None:
    with pytest.raises(TokenVMConfigError) as err:
        load_config({"mla_store_once": "sometimes"}, environ={})
    assert "mla_store_once='sometimes' is not a boolean" in str(err.value)
    assert "\n" not in str(err.value)
    assert load_config({}, environ={"TOKENVM_MLA_STORE_ONCE": "0"}).mla_store_once is False


def test_a_rank_that_never_sees_the_file_fails(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenvm_vllm.transfer import host_pool

    monkeypatch.setattr(host_pool, "SHARED_POOL_WAIT_S", 0.2)
    with pytest.raises(TokenVMConfigError, match="cannot open the shared host pool") as err:
        HostPool(4, 4096, pin=False, shared_path=str(tmp_path / "absent.pool"), create=False)
    assert "\n" not in str(err.value)
