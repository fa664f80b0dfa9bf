"""The parts of ``elastic/vmm.py`` a CPU machine can check: it imports without libcuda, says so
in one line when used, lays its structs out as ``cuda.h`` does, and builds tensor views over
raw pointers. The GPU half is ``tests/gpu/test_vmm.py``."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import torch

from tokenvm_vllm.elastic import vmm


def test_struct_layout_matches_cuda_h():
    # CUmemAllocationProp: type@0, requestedHandleTypes@4, location@8 (8 bytes),
    # win32HandleMetaData@16 (pointer), allocFlags@24 (8 bytes): 32 bytes.
    prop = vmm.CUmemAllocationProp
    assert ctypes.sizeof(prop) == 32
    assert [getattr(prop, f).offset for f in
            ("type", "requestedHandleTypes", "location", "win32HandleMetaData", "allocFlags")] \
        == [0, 4, 8, 16, 24]
    assert ctypes.sizeof(vmm.CUmemAllocFlags) == 8
    assert vmm.CUmemAllocFlags.usage.offset == 2 and vmm.CUmemAllocFlags.reserved.offset == 4
    assert ctypes.sizeof(vmm.CUmemLocation) == 8
    assert ctypes.sizeof(vmm.CUmemAccessDesc) == 12 and vmm.CUmemAccessDesc.flags.offset == 8
    p = vmm.allocation_prop(3)
    assert (p.type, p.requestedHandleTypes, p.location.type, p.location.id) == (1, 0, 1, 3)
    d = vmm.access_desc(1)
    assert (d.location.type, d.location.id, d.flags) == (1, 1, 3)


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="libcuda is present")
def test_without_libcuda_one_clear_error():
    with pytest.raises(vmm.CudaUnavailableError, match="libcuda.so.1.*needs an NVIDIA GPU"):
        vmm.VirtualRange(2 << 20)


def test_tensor_view_over_a_raw_pointer():
    buf = (ctypes.c_float * 24)(*range(24))
    t = vmm.tensor_view(ctypes.addressof(buf), 96, torch.float32, (2, 3, 4), torch.device("cpu"))
    assert t.shape == (2, 3, 4) and t.stride() == (12, 4, 1)
    assert t[1, 2, 3].item() == 23.0
    t[0, 0, 1] = -5.0  # writes land in the buffer: a view, not a copy
    assert buf[1] == -5.0
    with pytest.raises(ValueError, match=r"shape \(5, 5\).*needs 100 bytes, the range has 96"):
        vmm.tensor_view(ctypes.addressof(buf), 96, torch.float32, (5, 5), torch.device("cpu"))
