//! Processes whose output survives a kill (it goes to files), signals, and what a clear
//! failure looks like.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// No single process of this campaign should come near this; a hang fails the test instead.
pub const PROCESS_DEADLINE: Duration = Duration::from_secs(600);

/// A process whose stdout and stderr go to files, since a killed process's pipes would be lost.
pub struct Process {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub started: Instant,
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Start `cmd` with its output in `logs/<tag>.{out,err}`.
pub fn start(mut cmd: Command, logs: &Path, tag: &str) -> Process {
    std::fs::create_dir_all(logs).unwrap();
    let stdout = logs.join(format!("{tag}.out"));
    let stderr = logs.join(format!("{tag}.err"));
    let child = cmd
        .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Process { child, stdout, stderr, started: Instant::now() }
}

pub fn run(cmd: Command, logs: &Path, tag: &str) -> Finished {
    start(cmd, logs, tag).wait()
}

impl Process {
    pub fn running(&mut self) -> bool {
        assert!(self.started.elapsed() < PROCESS_DEADLINE, "a process ran for over {PROCESS_DEADLINE:?}");
        self.child.try_wait().unwrap().is_none()
    }

    /// Sleeps for `delay` unless the process ends first; true when it is still running.
    pub fn runs_for(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if !self.running() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.running()
    }

    /// Polls `done` every 5 ms until it holds (true) or the process ends (false).
    pub fn runs_until(&mut self, mut done: impl FnMut() -> bool) -> bool {
        loop {
            if done() {
                return true;
            }
            if !self.running() {
                return done();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    pub fn wait(mut self) -> Finished {
        let deadline = self.started + PROCESS_DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "a process ran for over {PROCESS_DEADLINE:?}: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Finished {
            status,
            took: self.started.elapsed(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

pub fn send_signal(pid: u32, signal: &str) {
    // The process may have ended a moment ago; that is for the caller to find out.
    let _ = Command::new("kill").args([signal, &pid.to_string()]).stderr(Stdio::null()).status();
}

/// The last line of stderr that is not empty: where `sae` prints its error.
pub fn error_line(run: &Finished) -> String {
    run.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// Non-zero exit by the program's own hand (not a signal), no panic, and the message names one
/// of `names_one_of` (the object's URL or key).
pub fn assert_clear_failure(run: &Finished, names_one_of: &[&str]) {
    assert!(!run.success(), "expected a failure, got success: {}", run.stderr);
    assert!(run.status.code().is_some(), "ended by a signal, not an error: {:?}\n{}", run.status, run.stderr);
    assert!(!run.stderr.contains("panicked at"), "a panic:\n{}", run.stderr);
    let message = error_line(run);
    assert!(
        names_one_of.iter().any(|n| message.contains(n)),
        "the error does not name {names_one_of:?}: {message}\nstderr:\n{}",
        run.stderr
    );
}
