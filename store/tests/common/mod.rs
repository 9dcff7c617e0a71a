//! Shared test fixtures: the S3-compatible servers (from testkit) shared by a test binary and
//! store options for them, a fault-injecting HTTP proxy, and synthetic activations.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use store::{
    BackoffConfig, ClientOptions, CorpusIdentity, CreatedInfo, DatasetHeader, Dtype, HookSpec, ModelIdentity,
    RetryConfig, RowBatch, StoreOptions, TokenizerIdentity,
};

/// Every object key under the dataset at `url`, relative to its prefix.
pub fn list_keys(url: &str, opts: &StoreOptions) -> std::collections::BTreeSet<String> {
    let loc = store::open_store_with(url, opts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use futures::TryStreamExt;
        let metas: Vec<_> = loc.store.list(Some(&loc.prefix)).try_collect().await.unwrap();
        metas.into_iter().map(|m| m.location.to_string()[loc.prefix.as_ref().len() + 1..].to_string()).collect()
    })
}

#[allow(unused_imports)] // each test binary uses a part of these
pub use testkit::{http_response, python, unique, S3Server, TempDir};

/// moto_server (in memory, no signature checks), shared by the tests of one test binary.
pub fn moto() -> &'static S3Server {
    static S: OnceLock<S3Server> = OnceLock::new();
    S.get_or_init(|| S3Server::moto("sae-test"))
}

/// s3s-fs (file-backed, checks SigV4), shared by the tests of one test binary.
pub fn s3s_fs() -> &'static S3Server {
    static S: OnceLock<S3Server> = OnceLock::new();
    S.get_or_init(|| S3Server::s3s_fs("sae-test"))
}

/// Test retry policy: few, fast retries.
pub fn test_retry(max_retries: usize) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            base: 2.0,
        },
        max_retries,
        retry_timeout: Duration::from_secs(20),
    }
}

/// Store options for an S3 endpoint (keys default to dummies, which moto accepts).
pub fn s3_options(endpoint: &str, access_key: &str, secret_key: &str, max_retries: usize) -> StoreOptions {
    StoreOptions {
        retry: Some(test_retry(max_retries)),
        // A fresh connection per request, so a proxy sees (and can fail) every request.
        client: Some(ClientOptions::new().with_pool_max_idle_per_host(0).with_timeout(Duration::from_secs(30))),
        s3_config: vec![
            ("aws_endpoint".into(), endpoint.into()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_region".into(), "us-east-1".into()),
            ("aws_access_key_id".into(), access_key.into()),
            ("aws_secret_access_key".into(), secret_key.into()),
            ("aws_virtual_hosted_style_request".into(), "false".into()),
        ],
    }
}

/// Store options for one of the test servers, with `max_retries` fast retries.
pub trait TestStoreOptions {
    fn options(&self, max_retries: usize) -> StoreOptions;
}

impl TestStoreOptions for S3Server {
    fn options(&self, max_retries: usize) -> StoreOptions {
        s3_options(&self.endpoint, &self.access_key, &self.secret_key, max_retries)
    }
}

/// The backends every store test runs on: memory://, file:// and S3 on moto_server.
pub struct Backend {
    pub name: &'static str,
    pub url: String,
    pub opts: StoreOptions,
    pub _dir: Option<TempDir>,
}

pub fn backends(name: &str) -> Vec<Backend> {
    let dir = TempDir::new(name);
    let file_url = format!("file://{}/ds", dir.path().display());
    vec![
        Backend {
            name: "memory",
            url: format!("memory://{}/ds", unique(name)),
            opts: StoreOptions::default(),
            _dir: None,
        },
        Backend { name: "file", url: file_url, opts: StoreOptions::default(), _dir: Some(dir) },
        Backend { name: "s3-moto", url: moto().url(name), opts: moto().options(3), _dir: None },
    ]
}

pub fn header(hooks: &[(&str, usize)], context_len: usize) -> DatasetHeader {
    DatasetHeader {
        model: ModelIdentity { name: "test-model".into(), file_sha256: "00".repeat(32) },
        tokenizer: TokenizerIdentity { name: "test-tok".into(), sha256: "11".repeat(32) },
        hooks: hooks.iter().map(|(n, d)| HookSpec { name: n.to_string(), d_model: *d }).collect(),
        context_len,
        corpus: CorpusIdentity { name: "synthetic".into(), sha256: "22".repeat(32), detail: String::new() },
        created: CreatedInfo { version: "test".into(), command_line: vec!["test".into()] },
    }
}

/// Deterministic pseudo-activations: `nseq` sequences of `ctx` tokens starting at `seq0`.
/// Row values depend only on (hook index, sequence id, position), so any slice can be rebuilt.
pub fn synth(seq0: u64, nseq: usize, ctx: usize, hooks: &[(&str, usize)]) -> RowBatch {
    let mut b = RowBatch::default();
    for s in 0..nseq as u64 {
        for p in 0..ctx as u32 {
            b.sequence_id.push(seq0 + s);
            b.position.push(p);
            b.token_id.push(((seq0 + s) * 31 + p as u64 * 7) as u32 % 49152);
        }
    }
    for (hi, (name, d)) in hooks.iter().enumerate() {
        let mut v = Vec::with_capacity(b.rows() * d);
        for (seq, pos) in b.sequence_id.iter().zip(&b.position) {
            v.extend(row_values(hi, *seq, *pos, *d));
        }
        b.activations.push((name.to_string(), v));
    }
    b
}

pub fn row_values(hook: usize, seq: u64, pos: u32, d: usize) -> Vec<f32> {
    let mut x = (hook as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15)
        ^ seq.wrapping_mul(0xBF58476D1CE4E5B9)
        ^ (pos as u64 + 1).wrapping_mul(0x94D049BB133111EB);
    (0..d)
        .map(|j| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (u - 0.5) * 4.0 + (j as f32 * 0.37).sin()
        })
        .collect()
}

/// The f32 values the dataset must hand back for these rows (rounded through `dtype`).
pub fn stored_values(dtype: Dtype, hook: usize, seq: u64, pos: u32, d: usize) -> Vec<f32> {
    let mut bytes = Vec::new();
    dtype.encode_f32(&row_values(hook, seq, pos, d), &mut bytes);
    let mut out = Vec::new();
    dtype.decode_to_f32(&bytes, &mut out);
    out
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

// ---------------------------------------------------------------------------------------------
// A fault-injecting HTTP proxy.

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Answer `503 Slow Down` to the next `n` matching requests.
    Http503(usize),
    /// Read the next `n` matching requests' heads, then close the connection without answering.
    Drop(usize),
}

struct ProxyState {
    fault: Fault,
    /// Only requests with this method are faulted (None: all).
    method: Option<String>,
    /// Only requests whose target contains this text are faulted (None: all).
    path: Option<String>,
    injected: usize,
    requests: usize,
    /// Request headers (lower case) removed before forwarding, to play a server that ignores them.
    stripped: Vec<String>,
}

/// A TCP proxy that understands just enough HTTP/1.1 (request head, Content-Length) to fail
/// whole requests. Each connection carries one request (the client pool is disabled in tests).
pub struct Proxy {
    pub port: u16,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState {
            fault: Fault::Pass,
            method: None,
            path: None,
            injected: 0,
            requests: 0,
            stripped: Vec::new(),
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream_port, st);
                });
            }
        });
        Proxy { port, state }
    }
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn set(&self, fault: Fault, method: Option<&str>) {
        let mut s = self.state.lock().unwrap();
        s.fault = fault;
        s.method = method.map(String::from);
        s.path = None;
    }
    /// Like [`Proxy::set`], but only for requests whose target (path and query) contains `path`.
    pub fn set_for_path(&self, fault: Fault, method: Option<&str>, path: &str) {
        self.set(fault, method);
        self.state.lock().unwrap().path = Some(path.to_string());
    }
    /// Remove the request header `name` from every forwarded request.
    pub fn strip_header(&self, name: &str) {
        self.state.lock().unwrap().stripped.push(name.to_ascii_lowercase());
    }
    pub fn injected(&self) -> usize {
        self.state.lock().unwrap().injected
    }
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }
}

fn read_head(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// Serve one request (the client's connection pool is disabled in tests: one request per
/// connection).
fn handle(mut client: TcpStream, upstream_port: u16, st: Arc<Mutex<ProxyState>>) -> std::io::Result<()> {
    {
        let head = read_head(&mut client)?;
        let text = String::from_utf8_lossy(&head).to_string();
        let mut request_line = text.split_whitespace();
        let method = request_line.next().unwrap_or("").to_string();
        let target = request_line.next().unwrap_or("").to_string();
        let len: usize = text
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        let stripped = st.lock().unwrap().stripped.clone();
        let action = {
            let mut s = st.lock().unwrap();
            s.requests += 1;
            let matches =
                s.method.as_deref().is_none_or(|m| m == method) && s.path.as_deref().is_none_or(|p| target.contains(p));
            match s.fault.clone() {
                Fault::Http503(n) if n > 0 && matches => {
                    s.fault = Fault::Http503(n - 1);
                    s.injected += 1;
                    Fault::Http503(1)
                }
                Fault::Drop(n) if n > 0 && matches => {
                    s.fault = Fault::Drop(n - 1);
                    s.injected += 1;
                    Fault::Drop(1)
                }
                _ => Fault::Pass,
            }
        };
        let mut body = vec![0u8; len];
        match action {
            Fault::Drop(_) => {
                let _ = client.shutdown(std::net::Shutdown::Both);
                Ok(())
            }
            Fault::Http503(_) => {
                client.read_exact(&mut body)?;
                let msg = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>";
                write!(client, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}", msg.len())
            }
            Fault::Pass => {
                client.read_exact(&mut body)?;
                let mut up = TcpStream::connect(("127.0.0.1", upstream_port))?;
                // Ask the upstream to close after answering, then stream its answer back.
                let mut head: String = text
                    .trim_end()
                    .split("\r\n")
                    .filter(|l| {
                        let l = l.to_ascii_lowercase();
                        !l.starts_with("connection:") && !stripped.iter().any(|h| l.starts_with(&format!("{h}:")))
                    })
                    .map(|l| format!("{l}\r\n"))
                    .collect();
                head.push_str("Connection: close\r\n\r\n");
                up.write_all(head.as_bytes())?;
                up.write_all(&body)?;
                let mut resp = Vec::new();
                up.read_to_end(&mut resp)?;
                client.write_all(&resp)
            }
        }
    }
}
