//! No message prints a credential: a secret planted in URLs (`s3://KEY:SECRET@bucket/...`), in
//! the endpoint's user info and in the `AWS_*` variables is looked for in the output of every
//! error path these commands reach: credentials in a URL, a bucket that does not answer, a
//! missing dataset, a failing train and capture.

use std::process::{Command, Output};

mod common;
use common::{stderr, stdout};

/// Planted where a user might put credentials; none may appear in any output.
const KEY_ID: &str = "AKIDPLANTEDKEY";
const SECRET: &str = "PlantedSecret0xyz";
const SECRET_WITH_SLASH: &str = "Planted/Slash/Secret";
const ENDPOINT_PASSWORD: &str = "PlantedEndpointPass";

fn sae(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sae"));
    cmd.args(args).env("RUST_LOG", "debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run sae")
}

fn assert_no_secret(out: &Output, what: &str) {
    let text = format!("{}\n{}", stdout(out), stderr(out));
    for secret in [KEY_ID, SECRET, SECRET_WITH_SLASH, "Planted/Slash", "Slash/Secret", ENDPOINT_PASSWORD] {
        assert!(!text.contains(secret), "{what}: the output holds the planted `{secret}`:\n{text}");
    }
}

/// S3 settings with planted credentials (in the variables and in the endpoint's user info) for
/// the S3 server at `endpoint` (`http://127.0.0.1:PORT`).
fn planted_aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    let host = endpoint.trim_start_matches("http://");
    vec![
        ("AWS_ENDPOINT", format!("http://{KEY_ID}:{ENDPOINT_PASSWORD}@{host}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
        ("AWS_SESSION_TOKEN", format!("{SECRET}-token")),
    ]
}

/// `output` is a refusal of credentials in `s3://…@bucket/data` that names the URL without them.
fn assert_refused_naming_the_redacted_url(output: &Output, what: &str) {
    assert!(!output.status.success(), "{what}: exit 0 with credentials in a URL");
    assert_no_secret(output, what);
    let err = stderr(output);
    assert!(err.contains("s3://bucket/data") && err.contains("credentials"), "{what}: the error names no URL: {err}");
}

#[test]
fn credentials_in_urls_are_refused_without_being_echoed() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let url = format!("s3://{KEY_ID}:{SECRET}@bucket/data");
    let slash_url = format!("s3://{KEY_ID}:{SECRET_WITH_SLASH}@bucket/data");
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("dataset info", vec!["dataset".into(), "info".into(), url.clone()]),
        ("dataset verify", vec!["dataset".into(), "verify".into(), slash_url.clone()]),
        ("dataset finalize", vec!["dataset".into(), "finalize".into(), url.clone()]),
        ("train --data", vec!["train".into(), "--data".into(), url.clone(), "--out".into(), out.into()]),
        ("train --data=", vec!["train".into(), format!("--data={slash_url}"), "--out".into(), out.into()]),
        ("train --out", vec!["train".into(), "--data".into(), out.into(), "--out".into(), slash_url.clone()]),
        ("capture --out", vec!["capture".into(), "--out".into(), url.clone(), "--max-tokens".into(), "10".into()]),
        ("capture --corpus", vec!["capture".into(), "--out".into(), out.into(), "--corpus".into(), slash_url.clone()]),
        ("eval", vec!["eval".into(), "--sae".into(), url.clone(), "--data".into(), out.into()]),
        (
            "features build",
            vec![
                "features".into(),
                "build".into(),
                "--sae".into(),
                slash_url.clone(),
                "--data".into(),
                out.into(),
                "--out".into(),
                out.into(),
            ],
        ),
    ];
    for (what, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = sae(&args, &[]);
        assert_refused_naming_the_redacted_url(&output, what);
    }
}

#[test]
fn failing_requests_with_planted_credentials_print_none() {
    // A real S3 server that answers at once (a missing bucket is not retried), where the HTTP
    // client quotes request URLs holding the endpoint's user info.
    let server = common::S3Server::moto("present-bucket");
    let env = planted_aws_env(&server.endpoint);
    let work = tempfile::tempdir().unwrap();
    let sae_out = work.path().join("sae");
    let sae_out = sae_out.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("info of an unreachable bucket", vec!["dataset", "info", "s3://no-such-bucket/data"]),
        ("info --json of an unreachable bucket", vec!["dataset", "info", "--json", "s3://no-such-bucket/data"]),
        ("verify of an unreachable bucket", vec!["dataset", "verify", "s3://no-such-bucket/data"]),
        ("train from an unreachable bucket", vec!["train", "--data", "s3://no-such-bucket/data", "--out", sae_out]),
        (
            "train into an unreachable bucket",
            vec!["train", "--data", "/nonexistent/dataset", "--out", "s3://no-such-bucket/sae"],
        ),
        ("missing dataset in a bucket", vec!["dataset", "info", "s3://present-bucket/no-such-data"]),
        ("missing local dataset", vec!["dataset", "info", "/nonexistent/dataset"]),
    ];
    for (what, args) in cases {
        let output = sae(&args, &env);
        assert!(!output.status.success(), "{what}: exit 0");
        assert_no_secret(&output, what);
        let err = stderr(&output);
        assert!(
            err.contains("no-such-bucket") || err.contains("no-such-data") || err.contains("/nonexistent/dataset"),
            "{what}: the error names no object: {err}"
        );
    }
}

#[test]
fn credentials_in_config_files_are_refused_without_being_echoed() {
    let work = tempfile::tempdir().unwrap();
    let url = format!("s3://{KEY_ID}:{SECRET}@bucket/data");
    let slash_url = format!("s3://{KEY_ID}:{SECRET_WITH_SLASH}@bucket/data");
    let files = [
        ("run: dir", "run", format!("dir = \"{url}\"\n")),
        (
            "run: [capture] corpus",
            "run",
            format!("dir = \"{}\"\n[capture]\ncorpus = [\"{slash_url}\"]\n", work.path().display()),
        ),
        ("run: [train] data", "run", format!("[train]\ndata = \"{url}\"\n")),
        ("train --config", "train", format!("data = \"{slash_url}\"\nout = \"{}\"\n", work.path().display())),
    ];
    for (i, (what, command, text)) in files.into_iter().enumerate() {
        let config = work.path().join(format!("config-{i}.toml"));
        std::fs::write(&config, text).unwrap();
        let output = sae(&[command, "--config", config.to_str().unwrap()], &[]);
        assert_refused_naming_the_redacted_url(&output, what);
        assert!(!work.path().join("data").exists(), "{what}: a stage ran");
    }
}
