// The NCCL half of the shim, compiled with -DUSE_C10D_NCCL -DUSE_CUDA against the CUDA and NCCL
// headers of the CUDA wheels torch depends on. Kept in its own translation unit so that the Gloo
// half builds without any CUDA header.

#include "c10d_shim_internal.h"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

c10::intrusive_ptr<c10d::Backend> sae_make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                                int rank, int world_size,
                                                std::chrono::milliseconds timeout,
                                                int device_index, const std::string& group_name) {
  const auto count = c10::cuda::device_count();
  TORCH_CHECK(count > 0, "the NCCL backend needs a CUDA device, and none is visible");
  TORCH_CHECK(device_index >= 0 && device_index < count, "CUDA device ", device_index,
              " does not exist (", static_cast<int>(count), " visible)");
  // NCCL picks the device from the tensors, but its barrier and communicator set-up use the
  // current device: one rank per GPU, the local rank's.
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  options->group_name = group_name;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
}
