// C ABI over PyTorch's c10d (TCPStore + ProcessGroupGloo / ProcessGroupNCCL), used by
// trainer/src/dist.rs. No C++ exception crosses this boundary: every function that can fail
// returns an error indicator and, through `err`, a message allocated with malloc that the caller
// releases with sae_c10d_free_error.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SaeC10dGroup SaeC10dGroup;

// Creates a process group. `backend` is "gloo" or "nccl". Rank 0 hosts the TCPStore on
// master_addr:master_port unless `store_client_only` is non-zero (torchrun's agent store), in
// which case every rank connects as a client. Keys go under `store_prefix`. `device_index` is
// the CUDA device of this rank (NCCL only; ignored by Gloo). `timeout_ms` bounds the store
// rendezvous and every collective. Returns NULL and sets *err on failure.
SaeC10dGroup* sae_c10d_new(const char* backend, int rank, int world_size, const char* master_addr,
                           uint16_t master_port, int store_client_only, int64_t timeout_ms,
                           int device_index, const char* store_prefix, char** err);

// Sums `tensors` (each an at::Tensor*) over all ranks, in place, tensors of one dtype coalesced
// into one buffer. With `average` non-zero the sums are divided by the world size (floor
// division for integer dtypes). Blocks until done or the timeout. Returns 0 on success.
int sae_c10d_all_reduce(SaeC10dGroup* group, void* const* tensors, size_t n, int average,
                        char** err);

// Overwrites `tensors` on every rank with root's values. Returns 0 on success.
int sae_c10d_broadcast(SaeC10dGroup* group, void* const* tensors, size_t n, int root, char** err);

// Returns once every rank has entered the barrier. Returns 0 on success.
int sae_c10d_barrier(SaeC10dGroup* group, char** err);

// Releases the group (and the store server, on the rank hosting it). NULL is a no-op.
void sae_c10d_destroy(SaeC10dGroup* group);

// Non-zero when the NCCL backend was compiled in.
int sae_c10d_has_nccl(void);

void sae_c10d_free_error(char* err);

#ifdef __cplusplus
}
#endif
