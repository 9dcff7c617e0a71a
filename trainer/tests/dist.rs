//! `trainer::dist` with real processes on loopback.
//!
//! Each multi-process test re-runs this test binary as its workers: with `SAE_DIST_WORKER` set,
//! the ignored `worker` test below (run with `--ignored`) becomes one rank of a scenario. Ranks get
//! their place from the same variables a launcher sets (`RANK`, `WORLD_SIZE`, ...), read by
//! `DistEnv::from_env`, so the torchrun test runs the very same worker under torchrun.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use testkit::free_port;
use trainer::dist::{has_nccl, Backend, DistEnv, DistError, ProcessGroup};

const WORKER_VAR: &str = "SAE_DIST_WORKER";
const TIMEOUT_VAR: &str = "SAE_DIST_TIMEOUT_MS";

// ---------------------------------------------------------------------------------------------
// The worker side.

/// One rank of a scenario. Ignored, so that it is not counted as a passing test: the
/// multi-process tests run it with `--ignored` and `SAE_DIST_WORKER` set.
#[test]
#[ignore = "a worker process of the multi-process tests, not a test of its own"]
fn worker() {
    let scenario = std::env::var(WORKER_VAR).unwrap_or_else(|_| panic!("run only as a worker, with {WORKER_VAR} set"));
    let timeout_ms: u64 = std::env::var(TIMEOUT_VAR).ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let env = DistEnv::from_env().expect("environment").expect("a distributed environment");
    let pg = match ProcessGroup::new(&env, Backend::Gloo, Duration::from_millis(timeout_ms)) {
        Ok(pg) => pg,
        Err(e) => fail(&e),
    };
    let rank = pg.rank();
    match scenario.as_str() {
        "collectives" => {
            if let Err(e) = collectives(&pg) {
                fail(&e);
            }
            println!("rank {rank} of {} ok agent_store={}", pg.world_size(), env.agent_store);
        }
        "stuck" | "dead" => {
            // One collective that works, then rank 1 stops taking part: it sleeps until the test
            // kills it ("dead") or until it is killed after rank 0 gave up ("stuck").
            let t = Tensor::from_slice(&[1.0f32]);
            pg.all_reduce_sum(&[&t]).unwrap_or_else(|e| fail(&e));
            if rank == 1 {
                println!("READY");
                std::thread::sleep(Duration::from_secs(600));
                std::process::exit(0);
            }
            println!("WAITING");
            match pg.all_reduce_sum(&[&t]) {
                Ok(()) => println!("all-reduce returned without its peer"),
                Err(e) => fail(&e),
            }
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Prints the error where the test looks for it and ends the worker with status 3.
fn fail(e: &DistError) -> ! {
    eprintln!("DIST ERROR: {e}");
    std::process::exit(3);
}

fn values<T>(t: &Tensor) -> Vec<T>
where
    for<'a> Vec<T>: TryFrom<&'a Tensor, Error = tch::TchError>,
{
    Vec::<T>::try_from(&t.reshape([-1])).expect("tensor values")
}

/// The tensors each rank contributes: different shapes and dtypes, a non-contiguous one, an
/// empty one, and a parameter that requires grad.
fn rank_tensors(r: usize) -> Vec<Tensor> {
    let rf = r as f64;
    let a = (Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).reshape([2, 3]) * (rf + 1.0)).set_requires_grad(true);
    let b = Tensor::from_slice(&[10 * (r as i64 + 1), r as i64, -3, 7]);
    let c = Tensor::from_slice(&[rf as f32]);
    // [2, 3] transposed: strides (1, 3).
    let d = (Tensor::arange(6, (Kind::Double, tch::Device::Cpu)) + 100.0 * rf).reshape([2, 3]).tr();
    let e = Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
    vec![a, b, c, d, e]
}

fn collectives(pg: &ProcessGroup) -> Result<(), DistError> {
    let r = pg.rank();
    assert_eq!(pg.world_size(), 2);

    // Sum.
    let t = rank_tensors(r);
    pg.all_reduce_sum(&t.iter().collect::<Vec<_>>())?;
    assert_eq!(values::<f32>(&t[0]), vec![0.0, 3.0, 6.0, 9.0, 12.0, 15.0]);
    assert_eq!(t[0].size(), vec![2, 3]);
    assert!(t[0].requires_grad(), "still a parameter");
    assert_eq!(values::<i64>(&t[1]), vec![30, 1, -6, 14]);
    assert_eq!(t[1].kind(), Kind::Int64);
    assert_eq!(values::<f32>(&t[2]), vec![1.0]);
    // d = [[0, 3], [1, 4], [2, 5]] + 100 r, summed over r = 0, 1.
    assert_eq!(t[3].size(), vec![3, 2]);
    assert_eq!(values::<f64>(&t[3]), vec![100.0, 106.0, 102.0, 108.0, 104.0, 110.0]);
    assert_eq!(t[4].size(), vec![0]);

    // Mean: the sum divided by 2; integers floored.
    let t = rank_tensors(r);
    pg.all_reduce_mean(&t.iter().collect::<Vec<_>>())?;
    assert_eq!(values::<f32>(&t[0]), vec![0.0, 1.5, 3.0, 4.5, 6.0, 7.5]);
    assert_eq!(values::<i64>(&t[1]), vec![15, 0, -3, 7]);
    assert_eq!(values::<f32>(&t[2]), vec![0.5]);
    assert_eq!(values::<f64>(&t[3]), vec![50.0, 53.0, 51.0, 54.0, 52.0, 55.0]);

    // Broadcast from rank 0 overwrites rank 1's values, and from rank 1 rank 0's.
    for root in [0, 1] {
        let t = rank_tensors(r);
        pg.broadcast(&t.iter().collect::<Vec<_>>(), root)?;
        let want = rank_tensors(root);
        assert_eq!(values::<f32>(&t[0]), values::<f32>(&want[0]));
        assert_eq!(values::<i64>(&t[1]), values::<i64>(&want[1]));
        assert_eq!(values::<f32>(&t[2]), values::<f32>(&want[2]));
        assert_eq!(values::<f64>(&t[3]), values::<f64>(&want[3]));
    }
    let e = pg.broadcast(&[], 2).unwrap_err().to_string();
    assert!(e.contains("root 2 is not below the world size"), "{e}");

    pg.barrier()?;

    // A refused collective (the same on both ranks) leaves the group unusable, and says so.
    let flags = Tensor::from_slice(&[true, false]);
    let e = pg.all_reduce_mean(&[&flags]).unwrap_err().to_string();
    assert!(e.contains("cannot average boolean tensors"), "{e}");
    assert!(e.contains(&format!("all-reduce (mean) on rank {r} of 2")), "{e}");
    let e = pg.barrier().unwrap_err().to_string();
    assert!(e.contains("unusable after an earlier failed collective"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The test side.

/// A child process whose stdout lines arrive on a channel and whose stderr is collected; killed
/// if the test ends early.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    stdout_seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn worker");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Proc { child, lines, stdout_seen: Vec::new(), stderr: Some(stderr) }
    }

    /// Waits for a stdout line holding `want` (libtest may print "test worker ... " before it).
    fn expect_line(&mut self, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(want);
                    self.stdout_seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => {
                    let stderr = self.finish_killed();
                    panic!(
                        "no line {want:?} within {within:?}; stdout so far: {:?}; stderr: {stderr}",
                        self.stdout_seen
                    )
                }
            }
        }
    }

    /// Waits for the exit, at most `within`; returns the status, stdout and stderr.
    fn wait(&mut self, within: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                panic!("process still running after {within:?}; stderr: {}", self.finish_killed());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.take().map(|h| h.join().unwrap()).unwrap_or_default();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.stdout_seen.push(line);
        }
        (status, self.stdout_seen.join("\n"), stderr)
    }

    fn finish_killed(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().map(|h| h.join().unwrap()).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// This test binary, as the worker of `scenario`, with the launcher variables of `rank`.
fn worker_command(scenario: &str, rank: usize, world: usize, port: u16, timeout_ms: u64) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "worker", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(WORKER_VAR, scenario)
        .env(TIMEOUT_VAR, timeout_ms.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
    cmd
}

fn spawn_pair(scenario: &str, timeout_ms: u64) -> (Proc, Proc) {
    let port = free_port();
    let r0 = Proc::spawn(worker_command(scenario, 0, 2, port, timeout_ms));
    let r1 = Proc::spawn(worker_command(scenario, 1, 2, port, timeout_ms));
    (r0, r1)
}

#[test]
fn two_processes_all_reduce_broadcast_barrier() {
    let t0 = Instant::now();
    let (mut r0, mut r1) = spawn_pair("collectives", 10_000);
    for (rank, p) in [(0, &mut r0), (1, &mut r1)] {
        let (status, out, err) = p.wait(Duration::from_secs(60));
        assert!(status.success(), "rank {rank}: {status}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains(&format!("rank {rank} of 2 ok agent_store=false")), "rank {rank}: {out}");
    }
    eprintln!("two ranks: sum, mean, broadcast, barrier in {:.2?}", t0.elapsed());
}

/// The venv's torchrun, if it is installed.
fn torchrun() -> Option<PathBuf> {
    Some(testkit::venv_bin("torchrun")).filter(|p| p.exists())
}

/// Under torchrun the agent hosts the TCPStore on MASTER_PORT and sets
/// TORCHELASTIC_USE_AGENT_STORE=True: both ranks, rank 0 included, must join as clients.
#[test]
fn torchrun_agent_store() {
    let Some(torchrun) = torchrun() else {
        eprintln!("skipped: no torchrun (run scripts/setup.sh, or set SAE_PYTHON)");
        return;
    };
    let t0 = Instant::now();
    let port = free_port();
    let mut cmd = Command::new(torchrun);
    cmd.args(["--no-python", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"])
        .arg(format!("--master-port={port}"))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "worker", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(WORKER_VAR, "collectives")
        .env(TIMEOUT_VAR, "10000")
        .env("OMP_NUM_THREADS", "1");
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"] {
        cmd.env_remove(var);
    }
    let mut p = Proc::spawn(cmd);
    let (status, out, err) = p.wait(Duration::from_secs(120));
    assert!(status.success(), "torchrun: {status}\nstdout:\n{out}\nstderr:\n{err}");
    for rank in 0..2 {
        assert!(out.contains(&format!("rank {rank} of 2 ok agent_store=true")), "rank {rank}:\n{out}\n{err}");
    }
    eprintln!("torchrun, 2 ranks on the agent store: {:.2?}", t0.elapsed());
}

/// Rank 1 is SIGKILLed while rank 0 waits for it in an all-reduce: rank 0 must fail with a
/// clear error, promptly (Gloo sees the closed connection), never hang.
#[test]
fn dead_peer_fails_fast_with_a_clear_error() {
    let (mut r0, mut r1) = spawn_pair("dead", 5_000);
    r1.expect_line("READY", Duration::from_secs(60));
    r0.expect_line("WAITING", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300)); // rank 0 is inside the all-reduce
    let killed = Instant::now();
    r1.child.kill().unwrap(); // SIGKILL
    let (status, out, err) = r0.wait(Duration::from_secs(60));
    let elapsed = killed.elapsed();
    assert_eq!(status.code(), Some(3), "rank 0: {status}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("DIST ERROR: all-reduce on rank 0 of 2 (store at 127.0.0.1:"), "{err}");
    assert!(err.contains("a peer may have died"), "{err}");
    assert!(elapsed < Duration::from_secs(60));
    eprintln!("rank 0 failed {elapsed:.2?} after its peer was killed: {}", err.trim());
}

/// Rank 1 stays alive but never joins the all-reduce: rank 0 fails once the timeout passes.
#[test]
fn stuck_peer_times_out() {
    let timeout = Duration::from_secs(3);
    let (mut r0, mut r1) = spawn_pair("stuck", timeout.as_millis() as u64);
    r1.expect_line("READY", Duration::from_secs(60));
    r0.expect_line("WAITING", Duration::from_secs(60));
    let waiting = Instant::now();
    let (status, out, err) = r0.wait(Duration::from_secs(60));
    let elapsed = waiting.elapsed();
    assert_eq!(status.code(), Some(3), "rank 0: {status}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("DIST ERROR: all-reduce on rank 0 of 2"), "{err}");
    assert!(err.contains("timeout 3 s"), "{err}");
    assert!(elapsed >= timeout - Duration::from_millis(500), "failed before the timeout: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    eprintln!("rank 0 timed out after {elapsed:.2?}: {}", err.trim());
    drop(r1); // killed
}

// ---------------------------------------------------------------------------------------------
// In-process checks: a group of one, and set-up errors.

/// Rank 0 of 1, hosting its own store on a free loopback port.
fn group_of_one() -> DistEnv {
    DistEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        agent_store: false,
    }
}

#[test]
fn group_of_one_is_the_identity() {
    let env = group_of_one();
    let pg = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(5)).unwrap();
    let t = Tensor::from_slice(&[1.5f32, -2.0]);
    let i = Tensor::from_slice(&[3i64, -3]);
    pg.all_reduce_sum(&[&t, &i]).unwrap();
    pg.all_reduce_mean(&[&t, &i]).unwrap();
    pg.broadcast(&[&t, &i], 0).unwrap();
    pg.barrier().unwrap();
    assert_eq!(values::<f32>(&t), vec![1.5, -2.0]);
    assert_eq!(values::<i64>(&i), vec![3, -3]);
}

#[test]
fn missing_store_is_reported_within_the_timeout() {
    // Rank 1 of 2, and nobody hosts the store.
    let port = free_port();
    let env = DistEnv {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: false,
    };
    let t0 = Instant::now();
    let e = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(2)).unwrap_err().to_string();
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(
        e.starts_with(&format!(
            "creating the gloo process group on rank 1 of 2 (store at 127.0.0.1:{port}, client of rank 0's store) failed:"
        )),
        "{e}"
    );
    assert!(e.ends_with("(timeout 2 s)"), "{e}");
    eprintln!("no store, after {:.2?}: {e}", t0.elapsed());
}

#[test]
fn taken_port_is_reported() {
    // Rank 0 hosting the store on a port that is in use: what torchrun's workers would hit
    // without the agent store.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let env = DistEnv {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: false,
    };
    let e = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(2)).unwrap_err().to_string();
    assert!(e.contains("rank 0 of 2") && e.contains("hosting it"), "{e}");
    assert!(e.to_lowercase().contains("address already in use"), "{e}");
    eprintln!("port taken: {e}");
}

// ---------------------------------------------------------------------------------------------
// NCCL.

/// The NCCL half of the shim is compiled and linked in this build. A user's own CPU-only
/// libtorch builds without it (build.rs warns); SAE_ALLOW_NO_NCCL=1 accepts that here.
#[test]
fn nccl_is_compiled_in() {
    if std::env::var("SAE_ALLOW_NO_NCCL").as_deref() == Ok("1") {
        return;
    }
    assert!(has_nccl(), "the c10d shim was built without NCCL: see build.rs's warning");
}

/// An NCCL group of one on the first GPU, where there is one. Without a GPU (or without NCCL in
/// the build) asking for NCCL must fail cleanly, through the NCCL code path when it is linked.
#[test]
fn nccl_group_on_a_gpu() {
    let env = group_of_one();
    if !has_nccl() {
        let e = ProcessGroup::new(&env, Backend::Nccl, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, DistError::NoNccl), "{e}");
        eprintln!("skipped: no NCCL in this build");
        return;
    }
    if !tch::Cuda::is_available() {
        let e = ProcessGroup::new(&env, Backend::Nccl, Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("the NCCL backend needs a CUDA device"), "{e}");
        eprintln!("no CUDA device; NCCL refused cleanly: {e}");
        return;
    }
    let pg = ProcessGroup::new(&env, Backend::Nccl, Duration::from_secs(30)).unwrap();
    let t = Tensor::from_slice(&[1.0f32, 2.0]).to_device(tch::Device::Cuda(0));
    pg.all_reduce_sum(&[&t]).unwrap();
    pg.broadcast(&[&t], 0).unwrap();
    pg.barrier().unwrap();
    assert_eq!(values::<f32>(&t.to_device(tch::Device::Cpu)), vec![1.0, 2.0]);
}

// ---------------------------------------------------------------------------------------------
// DistEnv::from_vars.

fn env_of(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, DistError> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    DistEnv::from_vars(|k| map.get(k).cloned())
}

#[test]
fn env_without_launcher_is_a_single_process() {
    assert_eq!(env_of(&[]).unwrap(), None);
    // A Slurm batch script (no job step) is one process, whatever SLURM_NTASKS says.
    assert_eq!(env_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).unwrap(), None);
    // A one-task step too.
    let one = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_STEP_ID", "0")];
    assert_eq!(env_of(&one).unwrap(), None);
}

#[test]
fn env_from_torchrun() {
    let e = env_of(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "1234"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        // srun around torchrun: torchrun's variables win.
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
        ("SLURM_STEP_ID", "0"),
    ])
    .unwrap()
    .unwrap();
    let want = DistEnv {
        rank: 3,
        world_size: 4,
        local_rank: 1,
        master_addr: "node0".into(),
        master_port: 1234,
        agent_store: true,
    };
    assert_eq!(e, want);
    // Manual launch: no agent store, LOCAL_RANK defaults to RANK, the port to 29500.
    let e = env_of(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")]).unwrap().unwrap();
    assert_eq!((e.local_rank, e.master_port, e.agent_store), (1, 29500, false));
}

#[test]
fn env_from_slurm() {
    let e = env_of(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_STEP_ID", "0"),
        ("MASTER_ADDR", "gpu17"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
    assert_eq!((e.master_addr.as_str(), e.master_port, e.agent_store), ("gpu17", 29500, false));
    let e = env_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0"), ("SLURM_STEP_ID", "0")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("MASTER_ADDR is not set"), "{e}");
}

#[test]
fn env_errors_name_the_variable() {
    let e = env_of(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x")]).unwrap_err().to_string();
    assert!(e.contains("rank 2 is not below the world size 2"), "{e}");
    let e = env_of(&[("RANK", "a"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x")]).unwrap_err().to_string();
    assert!(e.contains("RANK=\"a\" is not a non-negative integer"), "{e}");
    let e = env_of(&[("RANK", "0"), ("MASTER_ADDR", "x")]).unwrap_err().to_string();
    assert!(e.contains("WORLD_SIZE is not set"), "{e}");
    let e = env_of(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x"), ("MASTER_PORT", "99999")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("MASTER_PORT=\"99999\" is not a port number"), "{e}");
}
