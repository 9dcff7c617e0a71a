//! S3 faults: an s3s-fs server that can be crashed and restarted, the environment that points
//! `sae` at a server, and the kinds of proxy faults (503 storms, dropped connections).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::campaign::Rng;
use crate::common::descendants;
use crate::process::{send_signal, Finished, Process};
use crate::reference::verify;
use crate::store_common::{s3_options, Fault, Proxy};

pub const S3S_ACCESS_KEY: &str = "SAEFAULTSACCESSKEY";
pub const S3S_SECRET_KEY: &str = "sae-faults-secret-key-0123456789";
pub const S3S_BUCKET: &str = "faults";

/// s3s-fs on a fixed port and folder; `crash` SIGKILLs the server process itself.
pub struct RestartableS3 {
    pub port: u16,
    pub dir: PathBuf,
    /// The shell watchdog that ends the server if this test process dies.
    pub watchdog: Child,
}

impl RestartableS3 {
    pub fn start(dir: &Path, port: u16) -> RestartableS3 {
        std::fs::create_dir_all(dir.join(S3S_BUCKET)).unwrap();
        let args = testkit::s3s_fs_args(port, (S3S_ACCESS_KEY, S3S_SECRET_KEY), dir);
        let bin = testkit::s3s_fs_binary();
        // A restart right after a crash may find the port still held for a moment.
        for _ in 0..20 {
            let mut watchdog = testkit::spawn_watched(bin.to_str().unwrap(), &args, None);
            if testkit::wait_listening(port, &mut watchdog, "s3s-fs") {
                return RestartableS3 { port, dir: dir.to_path_buf(), watchdog };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("s3s-fs would not start on port {port}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn crash(&mut self) {
        for pid in descendants(self.watchdog.id()) {
            send_signal(pid, "-KILL");
        }
        let _ = self.watchdog.wait();
    }

    pub fn restart(&mut self) {
        self.crash();
        *self = RestartableS3::start(&self.dir.clone(), self.port);
    }

    pub fn options(&self) -> store::StoreOptions {
        s3_options(&self.endpoint(), S3S_ACCESS_KEY, S3S_SECRET_KEY, 3)
    }
}

impl Drop for RestartableS3 {
    fn drop(&mut self) {
        self.crash();
    }
}

/// The environment that points `sae` at an S3 endpoint.
pub fn s3_env(endpoint: &str, access_key: &str, secret_key: &str) -> impl Fn(&mut Command) {
    let (endpoint, access_key, secret_key) = (endpoint.to_string(), access_key.to_string(), secret_key.to_string());
    move |cmd: &mut Command| {
        cmd.env("AWS_ENDPOINT", &endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &access_key)
            .env("AWS_SECRET_ACCESS_KEY", &secret_key)
            // The test proxy serves one request per connection, so a pooled connection that it
            // closed would be a fault of the proxy's own rather than one the campaign injects.
            .env("AWS_POOL_MAX_IDLE_PER_HOST", "0");
    }
}

pub fn with_env(mut cmd: Command, env: &dyn Fn(&mut Command)) -> Command {
    env(&mut cmd);
    cmd
}

/// A failed capture leaves nothing torn: no manifest, or one whose every shard verifies.
pub fn nothing_torn(url: &str, env: &dyn Fn(&mut Command), opts: &store::StoreOptions, logs: &Path, tag: &str) {
    if store::info(url, opts).map(|i| i.is_final).unwrap_or(false) {
        let v = verify(url, env, logs, tag);
        assert!(v.success(), "a failed capture left a final dataset that does not verify: {}{}", v.stdout, v.stderr);
    }
}

/// The i-th fault of a kind: a short burst (within the client's 10 retries), a longer burst on
/// one method, or an outage that lasts until the process gives up.
pub fn storm(i: usize, rng: &mut Rng) -> (Fault, Option<&'static str>) {
    match i % 3 {
        0 => (Fault::Http503(usize::MAX), None),
        1 => (Fault::Http503(rng.between(1, 6) as usize), None),
        _ => (Fault::Http503(rng.between(8, 40) as usize), Some("PUT")),
    }
}

pub fn drops(i: usize, rng: &mut Rng) -> (Fault, Option<&'static str>) {
    match i % 3 {
        0 => (Fault::Drop(usize::MAX), None),
        1 => (Fault::Drop(rng.between(1, 4) as usize), None),
        _ => (Fault::Drop(rng.between(2, 12) as usize), Some(if rng.between(0, 1) == 0 { "PUT" } else { "GET" })),
    }
}

/// Waits for `p`, holding `fault` on the proxy from `delay` after its start until it ends.
/// Returns the run and whether a fault hit one of its requests.
pub fn run_with_fault(
    mut p: Process,
    proxy: &Proxy,
    delay: Duration,
    (fault, method): (Fault, Option<&'static str>),
) -> (Finished, bool) {
    let before = proxy.injected();
    if p.runs_for(delay) {
        proxy.set(fault, method);
    }
    let f = p.wait();
    proxy.set(Fault::Pass, None);
    (f, proxy.injected() > before)
}
