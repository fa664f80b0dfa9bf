/* TokenVM: CUDA VMM calls for many pages in one call from Python (tokenvm_vllm/elastic/vmm_batch.py).
 *
 * Why: a page group of elastic KV is one 2 MiB page in each of vLLM's per-layer KV tensors (32 on
 * an 8B Llama), so mapping it from Python is ~130 ctypes calls. Each call gives the GIL back and
 * takes it again; on the worker's reserve thread every one of those hand-offs is time the worker's
 * step may wait through. Here the loop runs in C: the caller (ctypes) releases the GIL once.
 *
 * No CUDA header is needed: the driver functions arrive as pointers taken from the library
 * Python already loaded (vmm.driver(); on CPU tests the stand-in libcuda), with the signatures
 * and struct layouts of cuda.h (CUDA 10.2 to 13).
 *
 * Build: cc -O2 -shared -fPIC -o libtokenvm_vmm_batch.so vmm_batch.c (vmm_batch.py does it once
 * per source version, at first use).
 */
#include <stddef.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

typedef struct {
    int type; /* CU_MEM_LOCATION_TYPE_DEVICE = 1 */
    int id;   /* device ordinal */
} CUmemLocation;

typedef struct {
    CUmemLocation location;
    int flags; /* CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3 */
} CUmemAccessDesc;

typedef CUresult (*cuMemMap_t)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                               unsigned long long);
typedef CUresult (*cuMemSetAccess_t)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
typedef CUresult (*cuMemUnmap_t)(CUdeviceptr, size_t);
typedef CUresult (*cuMemCreate_t)(CUmemGenericAllocationHandle *, size_t, const void *,
                                  unsigned long long);

/* Map handles[i] at addrs[i] (page_bytes each) and make it readable and writable by `device`,
 * for i = 0..n-1 in order. Returns 0 (CUDA_SUCCESS) or the first failing CUresult; then
 * *failed_at is that page's index, *failed_call is 0 for cuMemMap and 1 for cuMemSetAccess,
 * and every page this call mapped has been unmapped again (the handles stay the caller's). */
CUresult tokenvm_map_pages(void *map_fn, void *access_fn, void *unmap_fn,
                           const CUdeviceptr *addrs, const CUmemGenericAllocationHandle *handles,
                           size_t n, size_t page_bytes, int device, size_t *failed_at,
                           int *failed_call) {
    cuMemMap_t map = (cuMemMap_t)map_fn;
    cuMemSetAccess_t set_access = (cuMemSetAccess_t)access_fn;
    cuMemUnmap_t unmap = (cuMemUnmap_t)unmap_fn;
    CUmemAccessDesc desc = {{1, device}, 3};
    for (size_t i = 0; i < n; i++) {
        CUresult rc = map(addrs[i], page_bytes, 0, handles[i], 0);
        int call = 0;
        if (rc == 0) {
            rc = set_access(addrs[i], page_bytes, &desc, 1);
            call = 1;
            if (rc != 0)
                unmap(addrs[i], page_bytes);
        }
        if (rc != 0) {
            for (size_t j = 0; j < i; j++)
                unmap(addrs[j], page_bytes);
            *failed_at = i;
            *failed_call = call;
            return rc;
        }
    }
    return 0;
}

/* Create up to n handles of page_bytes with the allocation properties at `prop` into
 * handles[0..]; stops at the first failure. Returns how many were created; *rc is 0, or the
 * CUresult that stopped it (CUDA_ERROR_OUT_OF_MEMORY = 2 when the device is full). */
size_t tokenvm_create_handles(void *create_fn, const void *prop, size_t page_bytes, size_t n,
                              CUmemGenericAllocationHandle *handles, CUresult *rc) {
    cuMemCreate_t create = (cuMemCreate_t)create_fn;
    *rc = 0;
    for (size_t i = 0; i < n; i++) {
        *rc = create(&handles[i], page_bytes, prop, 0);
        if (*rc != 0)
            return i;
    }
    return n;
}
