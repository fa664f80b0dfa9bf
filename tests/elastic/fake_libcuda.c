/* A stand-in for libcuda.so.1's virtual-memory calls, for CPU machines (test double).
 *
 * It exists so that the ctypes layer in tokenvm_vllm/elastic/vmm.py (argument types, struct
 * layouts, context handling, error paths) runs for real in CI, where there is no GPU. Host memory
 * plays device memory: a reservation is a PROT_NONE mapping, a physical allocation a memfd, a map
 * an mmap of that memfd (no access until cuMemSetAccess, as on the GPU), an unmap puts the
 * PROT_NONE reservation back. It checks what the driver checks and a little more (struct fields
 * the caller must fill, a current context, offsets of zero, no double maps), and counts physical
 * bytes so tests can see memory follow the mapping. Signatures as in cuda.h.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;

#define OK 0
#define INVALID_VALUE 1
#define OUT_OF_MEMORY 2
#define INVALID_DEVICE 101
#define INVALID_CONTEXT 201
#define GRAN (2ull << 20)
#define MAX_SLOTS 65536

static __thread void *current_ctx;
static int primary_ctx;
static unsigned long long used_bytes;
static unsigned long long limit_bytes = 1ull << 40;
static size_t handle_size[MAX_SLOTS];   /* by fd */
static CUdeviceptr mapped_at[MAX_SLOTS]; /* by fd: where it is mapped, 0 if not */

unsigned long long fake_used_bytes(void) { return used_bytes; }
void fake_set_limit(unsigned long long bytes) { limit_bytes = bytes; }
int fake_mapped_count(void) {
    int n = 0;
    for (int i = 0; i < MAX_SLOTS; i++) n += mapped_at[i] != 0;
    return n;
}

static int prop_ok(const CUmemAllocationProp *p) {
    return p && p->type == 1 && p->requestedHandleTypes == 0 && p->location.type == 1 &&
           p->location.id == 0 && p->win32HandleMetaData == NULL &&
           p->allocFlags.compressionType == 0 && p->allocFlags.usage == 0;
}

CUresult cuInit(unsigned int flags) { return flags == 0 ? OK : INVALID_VALUE; }

CUresult cuGetErrorName(CUresult e, const char **s) {
    switch (e) {
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; return OK;
    case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; return OK;
    case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; return OK;
    case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; return OK;
    default: *s = NULL; return INVALID_VALUE;
    }
}

CUresult cuGetErrorString(CUresult e, const char **s) {
    switch (e) {
    case INVALID_VALUE: *s = "invalid argument"; return OK;
    case OUT_OF_MEMORY: *s = "out of memory"; return OK;
    case INVALID_DEVICE: *s = "invalid device ordinal"; return OK;
    case INVALID_CONTEXT: *s = "invalid device context"; return OK;
    default: *s = NULL; return INVALID_VALUE;
    }
}

CUresult cuDeviceGet(int *dev, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *dev = 0;
    return OK;
}
CUresult cuCtxGetCurrent(void **ctx) { *ctx = current_ctx; return OK; }
CUresult cuCtxSetCurrent(void *ctx) { current_ctx = ctx; return OK; }
CUresult cuCtxGetDevice(int *dev) {
    if (!current_ctx) return INVALID_CONTEXT;
    *dev = 0;
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    if (dev != 0) return INVALID_DEVICE;
    *ctx = &primary_ctx;
    return OK;
}
CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    if (!current_ctx) return INVALID_CONTEXT;
    *total = limit_bytes;
    *free_b = limit_bytes - used_bytes;
    return OK;
}

CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *p, int option) {
    if (!current_ctx) return INVALID_CONTEXT;
    if (!prop_ok(p) || (option != 0 && option != 1)) return INVALID_VALUE;
    *g = GRAN;
    return OK;
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t align, CUdeviceptr addr,
                             unsigned long long flags) {
    if (!current_ctx) return INVALID_CONTEXT;
    if (size == 0 || size % GRAN || addr != 0 || flags != 0 || (align && align % GRAN))
        return INVALID_VALUE;
    size_t a = align ? align : GRAN;
    char *raw = mmap(NULL, size + a, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (raw == MAP_FAILED) return OUT_OF_MEMORY;
    uintptr_t base = ((uintptr_t)raw + a - 1) / a * a;
    /* trim the slack so cuMemAddressFree(base, size) frees exactly the reservation */
    if (base > (uintptr_t)raw) munmap(raw, base - (uintptr_t)raw);
    size_t tail = (uintptr_t)raw + size + a - (base + size);
    if (tail) munmap((char *)(base + size), tail);
    *ptr = base;
    return OK;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    if (!current_ctx) return INVALID_CONTEXT;
    for (int i = 0; i < MAX_SLOTS; i++)
        if (mapped_at[i] && mapped_at[i] >= ptr && mapped_at[i] < ptr + size)
            return INVALID_VALUE; /* still mapped: the driver refuses too */
    return munmap((void *)ptr, size) == 0 ? OK : INVALID_VALUE;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *p,
                     unsigned long long flags) {
    if (!current_ctx) return INVALID_CONTEXT;
    if (!prop_ok(p) || flags != 0 || size == 0 || size % GRAN) return INVALID_VALUE;
    if (used_bytes + size > limit_bytes) return OUT_OF_MEMORY;
    int fd = memfd_create("fake_cuda_page", 0);
    if (fd < 0 || fd >= MAX_SLOTS) return OUT_OF_MEMORY;
    if (ftruncate(fd, (off_t)size) != 0) { close(fd); return OUT_OF_MEMORY; }
    handle_size[fd] = size;
    used_bytes += size;
    *h = (CUmemGenericAllocationHandle)fd;
    return OK;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
    if (!current_ctx) return INVALID_CONTEXT;
    if (h == 0 || h >= MAX_SLOTS || !handle_size[h]) return INVALID_VALUE;
    used_bytes -= handle_size[h];
    handle_size[h] = 0;
    close((int)h);
    return OK;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                  unsigned long long flags) {
    if (!current_ctx) return INVALID_CONTEXT;
    if (h == 0 || h >= MAX_SLOTS || !handle_size[h] || offset != 0 || flags != 0 ||
        size != handle_size[h] || ptr % GRAN || mapped_at[h])
        return INVALID_VALUE;
    for (int i = 0; i < MAX_SLOTS; i++)
        if (mapped_at[i] && mapped_at[i] < ptr + size && ptr < mapped_at[i] + handle_size[i])
            return INVALID_VALUE; /* overlaps a mapping */
    if (mmap((void *)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, (int)h, 0) == MAP_FAILED)
        return INVALID_VALUE;
    mapped_at[h] = ptr;
    return OK;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *d, size_t count) {
    if (!current_ctx) return INVALID_CONTEXT;
    if (count != 1 || d->location.type != 1 || d->location.id != 0 || d->flags != 3 ||
        ptr % GRAN || size % GRAN)
        return INVALID_VALUE;
    for (CUdeviceptr a = ptr; a < ptr + size; a += GRAN) { /* every page must be mapped */
        int found = 0;
        for (int i = 0; i < MAX_SLOTS && !found; i++)
            found = mapped_at[i] && mapped_at[i] <= a && a < mapped_at[i] + handle_size[i];
        if (!found) return INVALID_VALUE;
    }
    return mprotect((void *)ptr, size, PROT_READ | PROT_WRITE) == 0 ? OK : INVALID_VALUE;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    if (!current_ctx) return INVALID_CONTEXT;
    int found = -1;
    for (int i = 0; i < MAX_SLOTS; i++)
        if (mapped_at[i] == ptr && handle_size[i] == size) found = i;
    if (found < 0) return INVALID_VALUE;
    if (mmap((void *)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
             -1, 0) == MAP_FAILED)
        return INVALID_VALUE;
    mapped_at[found] = 0;
    return OK;
}
