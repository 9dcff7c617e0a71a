// Shared between the two translation units of the shim: the NCCL one is compiled only when the
// CUDA and NCCL headers are available (then SAE_HAVE_NCCL is defined for both).
#pragma once

#include <chrono>
#include <string>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#ifdef SAE_HAVE_NCCL
// Creates a ProcessGroupNCCL on CUDA device `device_index` (made the current device).
c10::intrusive_ptr<c10d::Backend> sae_make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                                int rank, int world_size,
                                                std::chrono::milliseconds timeout,
                                                int device_index, const std::string& group_name);
#endif
