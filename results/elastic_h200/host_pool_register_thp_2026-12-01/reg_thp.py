"""Does transparent huge page backing make cuMemHostRegister faster? (issue #13 start-up)"""
import ctypes, mmap, time, json, sys
import torch
from tokenvm_vllm.transfer.host_pool import _cuda_register

GIB = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
HUGE = 2 * 2**20
torch.cuda.init(); torch.zeros(1, device="cuda")
register, unregister = _cuda_register(0)
libc = ctypes.CDLL("libc.so.6", use_errno=True)
print("THP enabled:", open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip(),
      "defrag:", open("/sys/kernel/mm/transparent_hugepage/defrag").read().strip(), flush=True)

def one(name, huge, populate, chunk):
    n = int(GIB * 2**30)
    m = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = (-base) % HUGE
    addr = base + off
    t0 = time.perf_counter()
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE, off, n)
    t1 = time.perf_counter()
    if populate:
        m.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23), off, n)
    t2 = time.perf_counter()
    done = []
    for a in range(addr, addr + n, chunk):
        register(a, min(chunk, addr + n - a)); done.append(a)
    t3 = time.perf_counter()
    ahp = 0
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages"): ahp = int(line.split()[1]) // 1024
    for a in done: unregister(a)
    t4 = time.perf_counter()
    r = {"name": name, "gib": GIB, "populate_s": round(t2 - t1, 3), "register_s": round(t3 - t2, 3),
         "s_per_gib": round((t3 - t2) / GIB, 3), "unregister_s": round(t4 - t3, 3),
         "anon_huge_mib": ahp, "chunk_mib": chunk >> 20}
    print(json.dumps(r), flush=True)
    del done
    return r

out = []
for name, huge, pop, chunk in [("plain", 0, 0, 32 << 20), ("plain+populate", 0, 1, 32 << 20),
                               ("thp", 1, 0, 32 << 20), ("thp+populate", 1, 1, 32 << 20),
                               ("thp+populate 256M", 1, 1, 256 << 20), ("plain", 0, 0, 32 << 20)]:
    out.append(one(name, huge, pop, chunk))
