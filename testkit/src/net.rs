//! Loopback ports and bare HTTP/1.1 requests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a server may take to listen; generous, since tests share a few busy cores.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// A free TCP port on loopback (free when asked; a test binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something listens on `port`: true then, false if `child` (the server, named
/// `what` in messages) exits first. Panics if nothing listens within 60 s.
pub fn wait_listening(port: u16, child: &mut Child, what: &str) -> bool {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("{what} exited early: {status}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not listen on port {port} within {LISTEN_TIMEOUT:?}");
}

/// Sends a bare HTTP request (no body, no signature: for moto, which checks none) to `port` on
/// loopback and returns the whole response.
pub fn http_response(port: u16, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp
}

/// Like [`http_response`], but returns only the status code (0 when there is none).
pub fn http_status(port: u16, method: &str, path: &str) -> u16 {
    http_response(port, method, path).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}
