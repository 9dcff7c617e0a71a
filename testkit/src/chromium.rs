//! Headless Chromium, for tests of the pages the feature browser writes.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::temp::TempDir;

/// Where `make setup-test` installs Chromium; elsewhere it is looked up on PATH.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longer than Chromium's own `--timeout` (10 s), so that a hung browser fails the test.
const DEADLINE: Duration = Duration::from_secs(60);

/// The DOM after headless Chromium loaded `url` and ran its scripts (a fresh profile, no
/// network services). Panics if Chromium is missing, fails, hangs, or dumps no DOM.
pub fn chromium_dom(url: &str) -> String {
    let program = if Path::new(CHROMIUM).exists() { CHROMIUM } else { "chromium" };
    let profile = TempDir::new("chromium-profile");
    let mut child = Command::new(program)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--timeout=10000", "--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium is not installed: the feature-browser tests need it; run `make setup-test`");
    // Read both pipes while waiting, so that a chatty Chromium cannot block on a full pipe.
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            pipe.read_to_string(&mut s).map(|_| s)
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish on {url} within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = stdout.join().unwrap().unwrap();
    let errors = stderr.join().unwrap().unwrap_or_default();
    assert!(status.success(), "chromium failed on {url}: {status}\n{errors}");
    assert!(dom.contains("</html>"), "chromium dumped no DOM for {url}: {dom:?}");
    dom
}
