//! A features folder on a real S3-compatible server.

use super::*;

/// A features folder on a real S3-compatible server (moto on loopback): built there, found built
/// by a second run, read back by search and browse.
#[test]
fn features_live_on_s3() {
    let f = fixture();
    let server = S3Server::moto("feats");
    let url = "s3://feats/runs/features";
    let run = |args: &[&str]| {
        let mut cmd = Command::new(SAE_BIN);
        cmd.args(args).env("RUST_LOG", "warn");
        server.env(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "sae {args:?} failed: {}", stderr(&out));
        stdout(&out)
    };
    let build = [
        "features",
        "build",
        "--sae",
        &f.sae,
        "--data",
        &f.data,
        "--out",
        url,
        "--top-k",
        "3",
        "--context",
        "2",
        "--max-rows",
        "3000",
    ];
    assert!(run(&build).contains("3000 rows"));
    assert!(run(&build).contains("already built"));
    let text = run(&["features", "search", "--sae", &f.sae, "--prompt", PROMPT, "--features", url]);
    assert!(text.contains("logits ↑"), "{text}");
    let site = scratch("s3-site");
    let text = run(&["features", "browse", "--features", url, "--out", site.to_str().unwrap()]);
    assert!(
        text.contains("index.html") && site.join("index.html").exists() && site.join("features/01151.html").exists(),
        "{text}"
    );
}
