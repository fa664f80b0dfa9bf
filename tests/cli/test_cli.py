"""The ``tokenvm`` command line: doctor, inspect, and the bench summary/table/plot helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tokenvm_vllm import cli
from tokenvm_vllm.cli import bench, doctor
from tokenvm_vllm.tiers.disk import HEADER_BYTES, DiskStore

NS = bytes(range(16))
OTHER_NS = bytes(range(100, 116))
SLOT_BYTES = 8192
STATUSES = ("OK", "WARN", "FAIL")


def check_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in STATUSES]


def clean_env(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("TOKENVM_"):
            monkeypatch.delenv(name)


def test_doctor_prints_one_line_per_check(monkeypatch, capsys):
    clean_env(monkeypatch)
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    lines = check_lines(out)
    names = [line.split()[1] for line in lines]
    for name in ("python", "vllm", "torch", "config", "pinned", "PYTHONHASHSEED"):
        assert name in names, out
    assert len(lines) == len(doctor.doctor_checks())
    assert out.strip().splitlines()[-1].startswith("doctor: ")
    assert code == (1 if any(line.startswith("FAIL") for line in lines) else 0)
    # Nothing here should fail on a correctly installed CPU or GPU machine.
    assert not [line for line in lines if line.startswith("FAIL")], out


def test_doctor_says_whether_the_compiled_vmm_loop_builds(monkeypatch, tmp_path):
    """With ``elastic`` and ``elastic_compiled_maps``: OK naming the built library where a C
    compiler is found, WARN with the reason where none is."""
    import shutil

    from tokenvm_vllm.elastic import vmm_batch

    env = {"TOKENVM_ELASTIC": "true", "TOKENVM_ELASTIC_COMPILED_MAPS": "true"}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for compiler in (shutil.which("cc") or shutil.which("gcc"), None):
        monkeypatch.setattr(vmm_batch, "_tried", False)
        monkeypatch.setattr(vmm_batch, "_lib", None)
        if compiler is None:
            monkeypatch.setattr(vmm_batch.shutil, "which", lambda name: None)
            for old in tmp_path.rglob("*.so"):
                old.unlink()  # (else the library built above is found)
        (check,) = [c for c in doctor.doctor_checks(environ=env) if c.name == "elastic maps"]
        if compiler is None:
            assert check.status == doctor.WARN and "no C compiler" in check.detail
        else:
            assert check.status == doctor.OK and "libtokenvm_vmm_batch-" in check.detail
    assert not [c for c in doctor.doctor_checks(environ={}) if c.name == "elastic maps"]


def test_doctor_reports_a_bad_env_var_as_fail(monkeypatch, capsys):
    clean_env(monkeypatch)
    monkeypatch.setenv("TOKENVM_HOST_BYTES", "lots")
    assert cli.main(["doctor"]) == 1
    lines = check_lines(capsys.readouterr().out)
    config = [line for line in lines if line.split()[1] == "config"]
    assert len(config) == 1 and config[0].startswith("FAIL")
    assert "host_bytes" in config[0]


def test_doctor_console_script_exit_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENVM_")}
    env["TOKENVM_NO_SUCH_KEY"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tokenvm_vllm.cli", "doctor"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "TOKENVM_NO_SUCH_KEY" in proc.stdout


def test_doctor_disk_path_checks(monkeypatch, capsys, tmp_path):
    clean_env(monkeypatch)
    target = tmp_path / "new" / "disk"
    cli.main(["doctor", "--disk-path", str(target)])
    lines = check_lines(capsys.readouterr().out)
    by_name = {" ".join(line.split()[1:3]): line for line in lines}
    assert by_name["disk path"].startswith("OK") and "can be created" in by_name["disk path"]
    assert by_name["disk permissions"].startswith("OK")
    assert by_name["disk O_DIRECT"].split()[0] in ("OK", "WARN")
    assert by_name["disk free"].startswith(("OK", "WARN")) and "free of" in by_name["disk free"]
    assert not (tmp_path / "new").exists()  # doctor removed what it created for the probes


def test_doctor_disk_path_refusals(monkeypatch, capsys, tmp_path):
    clean_env(monkeypatch)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    assert cli.main(["doctor", "--disk-path", str(loose)]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("FAIL") and "disk permissions" in line for line in out.splitlines())
    assert os.listdir(loose) == []  # the O_DIRECT probe cleaned up
    (tmp_path / "file").write_text("x")
    assert cli.main(["doctor", "--disk-path", str(tmp_path / "file")]) == 1
    assert "is not a directory" in capsys.readouterr().out


def make_store(path, namespace: bytes, slots: list[int]) -> None:
    with DiskStore(str(path), 12 * (HEADER_BYTES + SLOT_BYTES), SLOT_BYTES, namespace) as store:
        for slot in slots:
            data = np.full(SLOT_BYTES, slot, dtype=np.uint8)
            assert store.write(slot, slot.to_bytes(36, "big"), data).result()


def test_inspect_reports_blocks_per_namespace(tmp_path, capsys):
    path = tmp_path / "store"
    make_store(path, NS, [0, 1, 2, 3, 7])
    make_store(path, OTHER_NS, [9, 10])
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    assert "12 slots of 8192 bytes" in out
    assert "used slots   7 of 12" in out
    namespaces = {line.split()[1]: line for line in out.splitlines()
                  if line.startswith("namespace")}
    assert set(namespaces) == {NS.hex(), OTHER_NS.hex()}
    assert " 5 blocks" in namespaces[NS.hex()] and " 2 blocks" in namespaces[OTHER_NS.hex()]
    assert "free of" in out

    assert cli.main(["inspect", "--json", "--verify", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["blocks_by_namespace"] == {NS.hex(): 5, OTHER_NS.hex(): 2}
    assert data["used_slots"] == 7 and data["bad_payloads"] == 0
    assert data["slot_bytes"] == SLOT_BYTES


def test_inspect_missing_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["inspect", str(missing)]) == 1
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and str(missing) in captured.err
    assert captured.out == ""
    assert not missing.exists()


def test_inspect_directory_without_store(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "no TokenVM disk store" in capsys.readouterr().err


def fake_result(pass_s: list[float], counters: dict[str, float], outputs: dict) -> dict:
    return {"settings": {"connector": "x"}, "startup_s": 1.0, "pass_s": pass_s,
            "counters": counters, "outputs": outputs,
            "workload": {"documents": 2, "questions": 2, "prefix_blocks": 4}}


def test_bench_summary_table_and_plot(tmp_path):
    source = "vllm:prompt_tokens_by_source"
    results = {
        "no offload": fake_result([4.0, 4.0], {f"{source}[local_compute]": 800},
                                  {"0:0": [1, 2], "1:0": [3, 4]}),
        "TokenVM": fake_result([4.0, 2.0], {f"{source}[local_compute]": 500,
                                            f"{source}[external_kv_transfer]": 300},
                               {"0:0": [1, 2], "1:0": [3, 5]}),
    }
    summary = bench.bench_summary(results)
    tvm = summary["configs"]["TokenVM"]
    assert tvm["speedup_pass2"] == pytest.approx(2.0)
    assert tvm["speedup_total"] == pytest.approx(8.0 / 6.0)
    assert tvm["tokens_by_source"] == {"computed": 500, "GPU cache": 0, "TokenVM": 300}
    assert tvm["outputs_equal_to_baseline"] == "1/2"
    table = bench.bench_table(summary)
    assert "2.00x" in table and "TokenVM" in table
    png = tmp_path / "bench.png"
    bench.bench_plot(summary, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
