"""Issue #11 item 5: ``tokenvm inspect`` accepts the configured ``disk_path`` and shows each
``rank-<r>`` store in it (the workers put their stores there)."""

from __future__ import annotations

import json

import numpy as np

from tokenvm_vllm import cli
from tokenvm_vllm.tiers.disk import DiskStore
from tokenvm_vllm.tiers.disk.format import slot_stride

SLOT_BYTES = 8192


def make_store(path, namespace: bytes, slots: list[int]) -> None:
    with DiskStore(str(path), 12 * slot_stride(SLOT_BYTES), SLOT_BYTES, namespace) as store:
        for slot in slots:
            data = np.full(SLOT_BYTES, slot, np.uint8)
            assert store.write(slot, slot.to_bytes(36, "big"), data).result()


def test_inspect_configured_disk_path_shows_every_rank(tmp_path, capsys):
    make_store(tmp_path / "rank-0", bytes(16), [0, 1, 2])
    make_store(tmp_path / "rank-1", bytes(range(16)), [4])
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    stores = [line for line in out.splitlines() if line.startswith("store")]
    assert len(stores) == 2
    assert str(tmp_path / "rank-0") in stores[0] and str(tmp_path / "rank-1") in stores[1]
    used = [line for line in out.splitlines() if line.startswith("used slots")]
    assert used[0].split()[2] == "3" and used[1].split()[2] == "1"

    assert cli.main(["inspect", "--json", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {rank: d["used_slots"] for rank, d in data["ranks"].items()} == {
        "rank-0": 3, "rank-1": 1}


def test_ranks_are_in_numeric_order(tmp_path, capsys):
    for rank in (10, 2):
        make_store(tmp_path / f"rank-{rank}", bytes(16), [rank % 12])
    assert cli.main(["inspect", str(tmp_path)]) == 0
    stores = [line for line in capsys.readouterr().out.splitlines() if line.startswith("store")]
    assert "rank-2" in stores[0] and "rank-10" in stores[1]


def test_one_store_directory_still_works(tmp_path, capsys):
    make_store(tmp_path / "rank-0", bytes(16), [0])
    assert cli.main(["inspect", "--json", str(tmp_path / "rank-0")]) == 0
    assert json.loads(capsys.readouterr().out)["used_slots"] == 1
