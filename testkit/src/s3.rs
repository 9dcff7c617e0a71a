//! S3-compatible servers on loopback for tests: moto_server (in memory, checks no signatures)
//! and s3s-fs (file-backed, checks SigV4), each under a watchdog that ends it with the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::net::{free_port, http_status, wait_listening};
use crate::temp::{unique, TempDir};
use crate::venv::venv_bin;

/// The keys s3s-fs is started with (moto accepts any).
const S3S_ACCESS_KEY: &str = "SAETESTACCESSKEY";
const S3S_SECRET_KEY: &str = "sae-test-secret-key-0123456789";

/// An S3 server process with one bucket, on a free loopback port. It ends when dropped, and
/// also when the test process dies (a shell watchdog sees to that: statics are never dropped).
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    pub port: u16,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    watchdog: Child,
    /// s3s-fs's objects.
    _dir: Option<TempDir>,
}

impl S3Server {
    /// moto_server (from the venv, or `SAE_MOTO_SERVER`, or PATH) with the bucket `bucket`.
    pub fn moto(bucket: &str) -> S3Server {
        let bin =
            find_binary("SAE_MOTO_SERVER", &[venv_bin("moto_server")], "moto_server", "pip install 'moto[server]'");
        for _ in 0..3 {
            let port = free_port();
            let args = ["-H".to_string(), "127.0.0.1".into(), "-p".into(), port.to_string()];
            let mut watchdog = spawn_watched(bin.to_str().unwrap(), &args, None);
            if !wait_listening(port, &mut watchdog, "moto_server") {
                continue;
            }
            // moto does not check signatures, so a plain PUT creates the bucket.
            assert_eq!(http_status(port, "PUT", &format!("/{bucket}")), 200, "create bucket on moto");
            return S3Server::new(port, bucket, ("test", "test"), watchdog, None);
        }
        panic!("moto_server would not start");
    }

    /// s3s-fs ([`s3s_fs_binary`]) serving a fresh temporary folder, with the bucket `bucket`.
    pub fn s3s_fs(bucket: &str) -> S3Server {
        let bin = s3s_fs_binary();
        for _ in 0..3 {
            let dir = TempDir::new("s3s-fs");
            std::fs::create_dir_all(dir.path().join(bucket)).unwrap();
            let port = free_port();
            let args = s3s_fs_args(port, (S3S_ACCESS_KEY, S3S_SECRET_KEY), dir.path());
            let mut watchdog = spawn_watched(bin.to_str().unwrap(), &args, Some(dir.path()));
            if !wait_listening(port, &mut watchdog, "s3s-fs") {
                continue;
            }
            return S3Server::new(port, bucket, (S3S_ACCESS_KEY, S3S_SECRET_KEY), watchdog, Some(dir));
        }
        panic!("s3s-fs would not start");
    }

    fn new(port: u16, bucket: &str, (access, secret): (&str, &str), watchdog: Child, dir: Option<TempDir>) -> Self {
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            bucket: bucket.to_string(),
            access_key: access.to_string(),
            secret_key: secret.to_string(),
            watchdog,
            _dir: dir,
        }
    }

    /// A fresh `s3://` URL in the bucket, named after `name`.
    pub fn url(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket, unique(name))
    }

    /// The object_store S3 settings (`aws_*` keys) that reach this server.
    pub fn s3_config(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", &self.access_key),
            ("aws_secret_access_key", &self.secret_key),
            ("aws_virtual_hosted_style_request", "false"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The environment that points a program (`sae`) at this server.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // SIGTERM, which the watchdog traps to end the server (a SIGKILL would orphan it).
        let _ = Command::new("kill").args(["-TERM", &self.watchdog.id().to_string()]).status();
        let _ = self.watchdog.wait();
    }
}

/// Starts `cmd args` under a shell watchdog that kills it once this test process is gone (or the
/// watchdog gets SIGTERM), then removes `cleanup` (a server's data directory), if given. The
/// returned child is the watchdog; the server runs as its child.
pub fn spawn_watched(cmd: &str, args: &[String], cleanup: Option<&Path>) -> Child {
    let script = r#"p=$1; dir=$2; shift 2; "$@" & c=$!; trap 'kill $c 2>/dev/null; wait $c 2>/dev/null; [ -n "$dir" ] && rm -rf "$dir"' EXIT INT TERM; while kill -0 "$p" 2>/dev/null && kill -0 "$c" 2>/dev/null; do sleep 0.3; done"#;
    let mut full = vec![
        "-c".to_string(),
        script.to_string(),
        "sh".into(),
        std::process::id().to_string(),
        cleanup.map(|d| d.display().to_string()).unwrap_or_default(),
        cmd.to_string(),
    ];
    full.extend(args.iter().cloned());
    Command::new("sh").args(&full).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn server")
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

/// The program `env` names, else the first of `candidates` that exists, else `name` on PATH.
fn find_binary(env: &str, candidates: &[PathBuf], name: &str, install: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    for c in candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in path.split(':') {
            let c = Path::new(dir).join(name);
            if c.is_file() {
                return c;
            }
        }
    }
    panic!("{name} not found (set {env}, or install it: {install}; scripts/setup.sh --test does this)");
}

/// s3s-fs's arguments: serve the folder `dir` on loopback `port` with the given keys.
pub fn s3s_fs_args(port: u16, (access_key, secret_key): (&str, &str), dir: &Path) -> Vec<String> {
    let port = port.to_string();
    let args = ["--host", "127.0.0.1", "--port", &port, "--access-key", access_key, "--secret-key", secret_key];
    args.iter().map(|a| a.to_string()).chain([dir.display().to_string()]).collect()
}

/// The s3s-fs binary (`SAE_S3S_FS`, else cargo's bin folder, else PATH).
pub fn s3s_fs_binary() -> PathBuf {
    find_binary(
        "SAE_S3S_FS",
        &[
            std::env::var("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|_| home().join(".cargo")).join("bin/s3s-fs"),
            home().join(".cargo/bin/s3s-fs"),
        ],
        "s3s-fs",
        "cargo install s3s-fs --version 0.14.1 --features binary",
    )
}
