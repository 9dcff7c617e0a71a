//! Data parallelism across processes, on PyTorch's own distributed engine (c10d).
//!
//! tch exposes no `torch.distributed`, so a small C++ shim (trainer/csrc, compiled by build.rs
//! against the libtorch that tch links) drives c10d's `TCPStore` and its Gloo (CPU) or NCCL
//! (CUDA) process groups, and this module wraps it in a safe API:
//!
//! * [`DistEnv::from_env`] reads what a launcher set: torchrun (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_USE_AGENT_STORE`) or Slurm's srun
//!   (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT`).
//! * [`ProcessGroup`] joins the group and runs the collectives a data-parallel trainer needs:
//!   all-reduce (sum or mean), broadcast and barrier, on tch tensors, in place.
//!
//! Every collective blocks until it completes or the group's timeout passes, so a dead or stuck
//! peer turns into a [`DistError`] naming the operation, the rank and the store, never a hang.
//! After a failed collective the group is unusable (as in PyTorch): end the process and let the
//! launcher restart the job.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tch::Tensor;

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    /// Opaque: `SaeC10dGroup` in trainer/csrc/c10d_shim.h.
    #[repr(C)]
    pub struct Group {
        _private: [u8; 0],
    }

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn sae_c10d_new(
            backend: *const c_char,
            rank: c_int,
            world_size: c_int,
            master_addr: *const c_char,
            master_port: u16,
            store_client_only: c_int,
            timeout_ms: i64,
            device_index: c_int,
            store_prefix: *const c_char,
            err: *mut *mut c_char,
        ) -> *mut Group;
        pub fn sae_c10d_all_reduce(
            group: *mut Group,
            tensors: *const *mut c_void,
            n: usize,
            average: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn sae_c10d_broadcast(
            group: *mut Group,
            tensors: *const *mut c_void,
            n: usize,
            root: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn sae_c10d_barrier(group: *mut Group, err: *mut *mut c_char) -> c_int;
        pub fn sae_c10d_destroy(group: *mut Group);
        pub fn sae_c10d_has_nccl() -> c_int;
        pub fn sae_c10d_free_error(err: *mut c_char);
    }
}

/// The port c10d (and torchrun) use when none is given.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which c10d process group carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, over TCP. Always available.
    Gloo,
    /// NCCL: CUDA tensors, one GPU per process. Available when [`has_nccl`] is true.
    Nccl,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the NCCL backend was compiled into this build: false when build.rs found no CUDA and
/// NCCL headers or a CPU-only libtorch (it then warned). Says nothing about GPUs being present.
pub fn has_nccl() -> bool {
    // SAFETY: a pure function of how the shim was compiled.
    unsafe { ffi::sae_c10d_has_nccl() != 0 }
}

/// Errors of this module. Each names what failed, where (rank, world size, store address) and
/// carries c10d's own message.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The launcher's environment variables are missing or malformed.
    #[error("distributed environment: {0}")]
    Env(String),
    /// Joining the process group failed (the store was unreachable, the port was taken, a rank
    /// never arrived within the timeout, ...).
    #[error(
        "creating the {backend} process group on rank {rank} of {world_size} (store at \
         {master}, {store_role}) failed: {message} (timeout {timeout})"
    )]
    Init {
        backend: Backend,
        rank: usize,
        world_size: usize,
        master: String,
        store_role: &'static str,
        timeout: String,
        message: String,
    },
    /// A collective failed or timed out; the group is unusable afterwards.
    #[error(
        "{op} on rank {rank} of {world_size} (store at {master}) failed: {message} (a peer may \
         have died or stopped calling {op}; timeout {timeout})"
    )]
    Collective { op: &'static str, rank: usize, world_size: usize, master: String, timeout: String, message: String },
    /// The NCCL backend was asked for, but this build has none (see [`has_nccl`]).
    #[error(
        "the NCCL backend is not in this build: build.rs found no CUDA/NCCL headers or a \
         CPU-only libtorch (pip install \"cuda-toolkit[nvcc,cccl]==13.0.2\" next to torch, or set \
         CUDA_HOME, then rebuild)"
    )]
    NoNccl,
}

/// Where this process sits in a distributed job, as its launcher described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// This process's rank on its machine: the CUDA device it should use.
    pub local_rank: usize,
    /// Host of the c10d TCPStore (rank 0's machine, or torchrun's agent).
    pub master_addr: String,
    /// Port of the TCPStore.
    pub master_port: u16,
    /// torchrun's agent already hosts the TCPStore (`TORCHELASTIC_USE_AGENT_STORE=True`): every
    /// rank, rank 0 included, connects to it as a client. Otherwise rank 0 hosts the store.
    pub agent_store: bool,
}

impl DistEnv {
    /// Reads the launcher's environment. `Ok(None)` means a single process: no variable says
    /// the job is distributed.
    ///
    /// * torchrun (or a manual launch): `RANK` and `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`
    ///   (default 29500), `LOCAL_RANK` (default: `RANK`, right on one machine) and
    ///   `TORCHELASTIC_USE_AGENT_STORE` (`True` under torchrun).
    /// * Slurm's srun: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR` and
    ///   `MASTER_PORT` (default 29500) set by the job script. Only inside a job step (when
    ///   `SLURM_STEP_ID` is set): the batch script itself also sees `SLURM_NTASKS`, but it is
    ///   one process, not the job's tasks. A one-task step is not distributed.
    ///
    /// torchrun's variables win when both are present (torchrun started by srun).
    pub fn from_env() -> Result<Option<DistEnv>, DistError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any source of variables (tests, or a configuration read
    /// elsewhere). Empty values count as unset.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let rank = parse_usize(&get, "RANK")?;
            let world_size = parse_usize(&get, "WORLD_SIZE")?;
            let local_rank = match get("LOCAL_RANK") {
                Some(_) => parse_usize(&get, "LOCAL_RANK")?,
                None => rank,
            };
            let (master_addr, master_port) = master(&get, "RANK and WORLD_SIZE are set")?;
            return Self::checked(rank, world_size, local_rank, master_addr, master_port, agent_store).map(Some);
        }
        if get("SLURM_PROCID").is_some() && get("SLURM_STEP_ID").is_some() {
            let world_size = parse_usize(&get, "SLURM_NTASKS")?;
            if world_size <= 1 {
                return Ok(None);
            }
            let rank = parse_usize(&get, "SLURM_PROCID")?;
            let local_rank = parse_usize(&get, "SLURM_LOCALID")?;
            let (master_addr, master_port) = master(
                &get,
                "this is a Slurm step of several tasks (set it to the first host of \
                 $SLURM_JOB_NODELIST, e.g. `scontrol show hostnames | head -n1`)",
            )?;
            return Self::checked(rank, world_size, local_rank, master_addr, master_port, false).map(Some);
        }
        Ok(None)
    }

    fn checked(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        master_addr: String,
        master_port: u16,
        agent_store: bool,
    ) -> Result<DistEnv, DistError> {
        if world_size == 0 {
            return Err(DistError::Env("the world size is 0".into()));
        }
        if rank >= world_size {
            return Err(DistError::Env(format!("rank {rank} is not below the world size {world_size}")));
        }
        Ok(DistEnv { rank, world_size, local_rank, master_addr, master_port, agent_store })
    }

    fn master(&self) -> String {
        if self.master_addr.contains(':') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

fn parse_usize(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<usize, DistError> {
    let value = get(name).ok_or_else(|| DistError::Env(format!("{name} is not set")))?;
    value.trim().parse().map_err(|_| DistError::Env(format!("{name}={value:?} is not a non-negative integer")))
}

fn master(get: &impl Fn(&str) -> Option<String>, why: &str) -> Result<(String, u16), DistError> {
    let addr = get("MASTER_ADDR").ok_or_else(|| DistError::Env(format!("MASTER_ADDR is not set, but {why}")))?;
    let port = match get("MASTER_PORT") {
        None => DEFAULT_MASTER_PORT,
        Some(p) => p.trim().parse().map_err(|_| DistError::Env(format!("MASTER_PORT={p:?} is not a port number")))?,
    };
    Ok((addr.trim().to_owned(), port))
}

/// Process groups created by this process, in order: each gets its own key prefix in the store,
/// so several groups (or a group re-created after another was dropped) never read each other's
/// rendezvous keys. As with torch.distributed, every rank must create its groups in the same
/// order.
static GROUPS_CREATED: AtomicUsize = AtomicUsize::new(0);

/// A c10d process group: this process's membership in the job, for collectives.
///
/// Collectives must be called in the same order, with tensors of the same dtypes and shapes, on
/// every rank. The group is `Send` but not `Sync`: one thread at a time issues collectives,
/// which keeps that order well defined. Dropping it leaves the group (and, on rank 0 without an
/// agent store, stops the store server: drop it on rank 0 last, e.g. after a final barrier).
pub struct ProcessGroup {
    handle: NonNull<ffi::Group>,
    rank: usize,
    world_size: usize,
    master: String,
    timeout: Duration,
}

// SAFETY: the C++ group has no thread affinity; `ProcessGroup` is not `Sync`, so it is used by
// one thread at a time.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the process group described by `env`, blocking until every rank has arrived or
    /// `timeout` passes. The same `timeout` then bounds every collective.
    ///
    /// Rank 0 hosts the c10d TCPStore on `master_addr:master_port` unless `env.agent_store`
    /// (torchrun's agent hosts it; every rank connects as a client). The group's keys live under
    /// their own prefix in the store, which for the agent store includes
    /// `TORCHELASTIC_RESTART_COUNT`: the agent's store outlives worker restarts, and a restarted
    /// job must not read the previous attempt's keys. For [`Backend::Nccl`] the current CUDA
    /// device becomes `env.local_rank`.
    pub fn new(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<Self, DistError> {
        let store_role = if env.agent_store {
            "client of torchrun's agent store"
        } else if env.rank == 0 {
            "hosting it"
        } else {
            "client of rank 0's store"
        };
        let init_error = |message: String| DistError::Init {
            backend,
            rank: env.rank,
            world_size: env.world_size,
            master: env.master(),
            store_role,
            timeout: fmt_timeout(timeout),
            message,
        };
        if backend == Backend::Nccl && !has_nccl() {
            return Err(DistError::NoNccl);
        }
        let to_int =
            |what: &str, v: usize| c_int::try_from(v).map_err(|_| init_error(format!("{what} {v} is too large")));
        let rank = to_int("rank", env.rank)?;
        let world_size = to_int("world size", env.world_size)?;
        let device = to_int("local rank", env.local_rank)?;
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX).max(1);
        // torchrun's agent store outlives restarts of the workers: keep each attempt's keys apart.
        let attempt = if env.agent_store {
            std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|_| "0".into())
        } else {
            "0".into()
        };
        let index = GROUPS_CREATED.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sae_pipeline/attempt{attempt}/pg{index}/");
        let c_backend = CString::new(backend.name()).expect("no NUL");
        let c_addr =
            CString::new(env.master_addr.as_str()).map_err(|_| init_error("MASTER_ADDR contains a NUL byte".into()))?;
        let c_prefix = CString::new(prefix).expect("no NUL");
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: all strings are valid NUL-terminated C strings that outlive the call; `err` is
        // a valid out-pointer.
        let handle = unsafe {
            ffi::sae_c10d_new(
                c_backend.as_ptr(),
                rank,
                world_size,
                c_addr.as_ptr(),
                env.master_port,
                c_int::from(env.agent_store),
                timeout_ms,
                device,
                c_prefix.as_ptr(),
                &mut err,
            )
        };
        match NonNull::new(handle) {
            Some(handle) => {
                Ok(ProcessGroup { handle, rank: env.rank, world_size: env.world_size, master: env.master(), timeout })
            }
            None => {
                let mut message = take_error(err);
                if !env.agent_store && env.rank == 0 && message.contains("EADDRINUSE") {
                    message.push_str(
                        "; another process holds MASTER_PORT (under torchrun its agent hosts the \
                         store there, and TORCHELASTIC_USE_AGENT_STORE=True must reach this \
                         process)",
                    );
                }
                Err(init_error(message))
            }
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Replaces each tensor by its sum over all ranks, in place. Tensors of one dtype travel in
    /// one buffer, so a list of many small tensors (gradients) costs one round trip per dtype.
    ///
    /// The tensors are written through shared references, as tch's tensors share their storage:
    /// every handle to the same storage sees the result.
    pub fn all_reduce_sum(&self, tensors: &[&Tensor]) -> Result<(), DistError> {
        self.all_reduce(tensors, false, "all-reduce")
    }

    /// Replaces each tensor by its mean over all ranks, in place: the sum, divided by the world
    /// size (Gloo has no averaging reduction). Integer tensors get the floor of the mean, as
    /// PyTorch's `//`; boolean tensors are refused.
    pub fn all_reduce_mean(&self, tensors: &[&Tensor]) -> Result<(), DistError> {
        self.all_reduce(tensors, true, "all-reduce (mean)")
    }

    /// Overwrites each tensor, on every rank, with rank `root`'s values, in place: e.g. the
    /// initial parameters, so that every replica starts from the same SAE.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<(), DistError> {
        let op = "broadcast";
        if root >= self.world_size {
            return Err(self.error(op, format!("root {root} is not below the world size")));
        }
        let ptrs = tensor_ptrs(tensors);
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handle is live; the pointers are live `at::Tensor*` borrowed for the call.
        let rc = unsafe {
            ffi::sae_c10d_broadcast(self.handle.as_ptr(), ptrs.as_ptr(), ptrs.len(), root as c_int, &mut err)
        };
        self.check(op, rc, err)
    }

    /// Returns once every rank has called `barrier`.
    pub fn barrier(&self) -> Result<(), DistError> {
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handle is live; `err` is a valid out-pointer.
        let rc = unsafe { ffi::sae_c10d_barrier(self.handle.as_ptr(), &mut err) };
        self.check("barrier", rc, err)
    }

    fn all_reduce(&self, tensors: &[&Tensor], average: bool, op: &'static str) -> Result<(), DistError> {
        let ptrs = tensor_ptrs(tensors);
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handle is live; the pointers are live `at::Tensor*` borrowed for the call.
        let rc = unsafe {
            ffi::sae_c10d_all_reduce(self.handle.as_ptr(), ptrs.as_ptr(), ptrs.len(), c_int::from(average), &mut err)
        };
        self.check(op, rc, err)
    }

    fn check(&self, op: &'static str, rc: c_int, err: *mut c_char) -> Result<(), DistError> {
        if rc == 0 {
            return Ok(());
        }
        Err(self.error(op, take_error(err)))
    }

    fn error(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective {
            op,
            rank: self.rank,
            world_size: self.world_size,
            master: self.master.clone(),
            timeout: fmt_timeout(self.timeout),
            message,
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from sae_c10d_new and is destroyed exactly once.
        unsafe { ffi::sae_c10d_destroy(self.handle.as_ptr()) }
    }
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("master", &self.master)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn tensor_ptrs(tensors: &[&Tensor]) -> Vec<*mut c_void> {
    // `as_ptr` is the tensor's `at::Tensor*`; the shim writes its storage, not the handle.
    tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// Takes ownership of a message from the shim.
fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error (the c10d shim returned no message)".into();
    }
    // SAFETY: the shim returns a NUL-terminated string from malloc, released here exactly once.
    let message = unsafe { CStr::from_ptr(err) }.to_string_lossy().trim().to_owned();
    unsafe { ffi::sae_c10d_free_error(err) };
    message
}

fn fmt_timeout(timeout: Duration) -> String {
    if timeout.subsec_millis() == 0 && timeout.as_secs() > 0 {
        format!("{} s", timeout.as_secs())
    } else {
        format!("{} ms", timeout.as_millis())
    }
}
