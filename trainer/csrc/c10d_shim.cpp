// A small C ABI over PyTorch's distributed engine (c10d): a TCPStore rendezvous and a Gloo (CPU)
// or NCCL (CUDA) process group, for trainer/src/dist.rs. See c10d_shim.h for the contract.
//
// Every entry point catches all C++ exceptions and turns them into a malloc'ed message: nothing
// may unwind into Rust.

#include "c10d_shim.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "c10d_shim_internal.h"

struct SaeC10dGroup {
  // The store must outlive the backend: Gloo and NCCL keep using it after the rendezvous
  // (NCCL for its communicator ids, both for error reporting).
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout{0};
  int rank = 0;
  int world_size = 0;
  bool nccl = false;
  // Set after a failed collective: the group is then unusable, and destroy aborts instead of
  // shutting down cleanly (a clean NCCL shutdown could wait on the broken communicator).
  bool failed = false;
};

namespace {

char* dup_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, message.c_str(), message.size() + 1);
  }
  return out;
}

void set_error(char** err, const std::string& message) {
  if (err != nullptr) {
    *err = dup_message(message);
  }
}

// Runs `body`, turning any exception into a message. c10 errors carry a C++ backtrace in
// what(); the message without it is what a user can act on.
template <typename F>
int guarded(char** err, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, e.what());
  } catch (...) {
    set_error(err, "unknown C++ exception");
  }
  return 1;
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

// The Gloo transport device, chosen as torch.distributed does: GLOO_SOCKET_IFNAME (a
// comma-separated list of interfaces) wins; otherwise this machine's hostname, falling back to
// loopback. When the master is on loopback every rank is on this machine, so bind there
// directly: the hostname may resolve to an address other processes cannot reach.
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices(const std::string& master) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
  const char* ifnames = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifnames != nullptr && ifnames[0] != '\0') {
    std::string list(ifnames);
    size_t start = 0;
    while (start <= list.size()) {
      size_t end = list.find(',', start);
      if (end == std::string::npos) {
        end = list.size();
      }
      std::string name = list.substr(start, end - start);
      if (!name.empty()) {
        devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      }
      start = end + 1;
    }
  }
  if (devices.empty()) {
    devices.push_back(is_loopback(master)
                          ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                          : c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return devices;
}

std::vector<at::Tensor> collect(void* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i] != nullptr, "tensor ", i, " is a null pointer");
    const at::Tensor& t = *static_cast<const at::Tensor*>(tensors[i]);
    TORCH_CHECK(t.defined(), "tensor ", i, " is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "tensor ", i, " is not dense (", t.layout(), ")");
    out.push_back(t);
  }
  return out;
}

// Tensors that travel in one buffer: same dtype and device, in first-seen order (the same on
// every rank when every rank passes the same list).
struct Bucket {
  std::vector<at::Tensor> tensors;
};

std::vector<Bucket> buckets_of(const std::vector<at::Tensor>& tensors) {
  std::vector<Bucket> buckets;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) {
      continue;
    }
    auto same = [&](const Bucket& b) {
      return b.tensors.front().scalar_type() == t.scalar_type() &&
             b.tensors.front().device() == t.device();
    };
    auto it = std::find_if(buckets.begin(), buckets.end(), same);
    if (it == buckets.end()) {
      buckets.push_back(Bucket{{t}});
    } else {
      it->tensors.push_back(t);
    }
  }
  return buckets;
}

// One flat buffer for a bucket. A bucket of one contiguous tensor is used as is (no copy).
at::Tensor flatten(const Bucket& bucket) {
  if (bucket.tensors.size() == 1 && bucket.tensors.front().is_contiguous()) {
    return bucket.tensors.front().view({-1});
  }
  std::vector<at::Tensor> flat;
  flat.reserve(bucket.tensors.size());
  for (const at::Tensor& t : bucket.tensors) {
    flat.push_back(t.reshape({-1}));
  }
  return at::cat(flat);
}

void unflatten(const Bucket& bucket, const at::Tensor& flat) {
  if (bucket.tensors.size() == 1 && flat.data_ptr() == bucket.tensors.front().data_ptr()) {
    return;  // reduced in place
  }
  int64_t offset = 0;
  for (const at::Tensor& t : bucket.tensors) {
    const int64_t n = t.numel();
    // copy_ on a const at::Tensor& writes the shared storage, which is the point.
    const_cast<at::Tensor&>(t).copy_(flat.narrow(0, offset, n).view(t.sizes()));
    offset += n;
  }
}

void wait(SaeC10dGroup* g, const c10::intrusive_ptr<c10d::Work>& work) {
  // An explicit timeout makes the wait blocking for NCCL too (the CPU thread waits for the
  // kernels), so a dead or stuck peer shows up here as an error after `timeout`.
  work->wait(g->timeout);
}

template <typename F>
int collective(SaeC10dGroup* g, char** err, F&& body) {
  if (g == nullptr) {
    set_error(err, "the process group is null (already destroyed?)");
    return 1;
  }
  if (g->failed) {
    set_error(err, "the process group is unusable after an earlier failed collective");
    return 1;
  }
  int rc = guarded(err, [&] {
    // Parameters usually require grad; the collectives only move values.
    at::NoGradGuard no_grad;
    body();
  });
  if (rc != 0) {
    g->failed = true;
  }
  return rc;
}

}  // namespace

extern "C" {

SaeC10dGroup* sae_c10d_new(const char* backend, int rank, int world_size, const char* master_addr,
                           uint16_t master_port, int store_client_only, int64_t timeout_ms,
                           int device_index, const char* store_prefix, char** err) {
  SaeC10dGroup* out = nullptr;
  guarded(err, [&] {
    TORCH_CHECK(backend != nullptr && master_addr != nullptr && store_prefix != nullptr,
                "null argument");
    TORCH_CHECK(world_size >= 1, "world size must be at least 1, got ", world_size);
    TORCH_CHECK(rank >= 0 && rank < world_size, "rank ", rank, " is outside 0..", world_size);
    TORCH_CHECK(timeout_ms > 0, "the timeout must be positive");
    const std::string name(backend);
    const std::string master(master_addr);
    const std::chrono::milliseconds timeout(timeout_ms);

    c10d::TCPStoreOptions opts;
    opts.port = master_port;
    opts.isServer = rank == 0 && store_client_only == 0;
    // Nobody waits for all workers in the store's constructor: the process group's own
    // rendezvous (below) waits for every rank, under the same timeout.
    opts.waitWorkers = false;
    opts.timeout = timeout;
    // Several groups in one process may share rank 0's store server on master_addr:port.
    opts.multiTenant = true;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(master, opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(store_prefix), tcp);

    auto group = std::make_unique<SaeC10dGroup>();
    group->timeout = timeout;
    group->rank = rank;
    group->world_size = world_size;
    if (name == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices = gloo_devices(master);
      options->group_name = store_prefix;
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
    } else if (name == "nccl") {
#ifdef SAE_HAVE_NCCL
      group->backend = sae_make_nccl(store, rank, world_size, timeout, device_index, store_prefix);
      group->nccl = true;
#else
      (void)device_index;
      TORCH_CHECK(false,
                  "this build has no NCCL support (its CUDA/NCCL headers were missing at build "
                  "time); use the gloo backend or rebuild with them");
#endif
    } else {
      TORCH_CHECK(false, "unknown backend '", name, "' (expected gloo or nccl)");
    }
    group->store = store;
    out = group.release();
  });
  return out;
}

int sae_c10d_all_reduce(SaeC10dGroup* group, void* const* tensors, size_t n, int average,
                        char** err) {
  return collective(group, err, [&] {
    const std::vector<at::Tensor> list = collect(tensors, n);
    for (const Bucket& bucket : buckets_of(list)) {
      const at::ScalarType dtype = bucket.tensors.front().scalar_type();
      TORCH_CHECK(!average || dtype != at::kBool, "cannot average boolean tensors");
      std::vector<at::Tensor> flat{flatten(bucket)};
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      opts.timeout = group->timeout;
      wait(group, group->backend->allreduce(flat, opts));
      if (average && group->world_size > 1) {
        if (at::isFloatingType(dtype) || at::isComplexType(dtype)) {
          flat[0].div_(group->world_size);
        } else {
          flat[0].div_(group->world_size, "floor");
        }
      }
      unflatten(bucket, flat[0]);
    }
  });
}

int sae_c10d_broadcast(SaeC10dGroup* group, void* const* tensors, size_t n, int root, char** err) {
  return collective(group, err, [&] {
    TORCH_CHECK(root >= 0 && root < group->world_size, "root ", root, " is outside 0..",
                group->world_size);
    const std::vector<at::Tensor> list = collect(tensors, n);
    for (const Bucket& bucket : buckets_of(list)) {
      std::vector<at::Tensor> flat{flatten(bucket)};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      opts.rootTensor = 0;
      opts.timeout = group->timeout;
      wait(group, group->backend->broadcast(flat, opts));
      if (group->rank != root) {
        unflatten(bucket, flat[0]);
      }
    }
  });
}

int sae_c10d_barrier(SaeC10dGroup* group, char** err) {
  return collective(group, err, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    wait(group, group->backend->barrier(opts));
  });
}

void sae_c10d_destroy(SaeC10dGroup* group) {
  if (group == nullptr) {
    return;
  }
  // Destructors may throw in theory (they join threads); never let that reach Rust.
  guarded(nullptr, [&] {
    if (group->backend) {
      if (group->failed) {
        group->backend->abort();
      } else {
        group->backend->shutdown();
      }
    }
    group->backend.reset();
    group->store.reset();
  });
  delete group;
}

int sae_c10d_has_nccl(void) {
#ifdef SAE_HAVE_NCCL
  return 1;
#else
  return 0;
#endif
}

void sae_c10d_free_error(char* err) { std::free(err); }

}  // extern "C"
