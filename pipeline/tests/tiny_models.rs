//! capture → train → features build → search → steer on a Hugging Face folder of each family
//! beside Llama: the tiny random models that `scripts/tiny_models.py` makes with transformers
//! (capture's `tiny_models` test checks their numbers against transformers; this checks that
//! every stage of the pipeline runs on them and reports what it did).

use std::process::Output;

mod common;
use common::{last_json, sae, sae_with, scratch, stderr};
use testkit::tiny_model;

/// Families with a tiny model, one per implementation file (llama.rs covers llama3 and qwen2).
const FAMILIES: &[&str] = &["gpt2", "gpt_neox", "gemma2", "qwen2", "llama3"];
/// The tiny models have 3 blocks of width 64.
const HOOK: &str = "blocks.1.hook_resid_post";
const D_MODEL: u64 = 64;

fn ok(what: &str, out: Output) -> Output {
    assert!(out.status.success(), "{what} failed: {}", stderr(&out));
    out
}

fn every_stage_runs_on(family: &str) {
    let model = tiny_model(family);
    let model = model.to_str().unwrap();
    let path = |name: &str| scratch(&format!("{family}-{name}")).display().to_string();
    let (data, sae_dir, features) = (path("data"), path("sae"), path("features"));
    let threads = "--threads 2";

    let flags =
        format!("--hook {HOOK} --max-tokens 3000 --context-len 32 --batch-size 4 --row-group-rows 256 {threads}");
    ok("capture", sae_with(&["capture", "--model", model, "--out", &data], &flags));
    let train = "--latents 256 --k 8 --batch-size 128 --max-tokens 8192 --lr 1e-3 --no-eval --quiet --json --threads 2";
    let summary = last_json(&ok("train", sae_with(&["train", "--data", &data, "--out", &sae_dir], train)));
    assert_eq!(summary["d_in"], D_MODEL, "{family}: {summary}");
    assert_eq!(summary["tokens"], 8192, "{family}: {summary}");
    let fvu = summary["fvu"].as_f64().unwrap();
    assert!(fvu.is_finite() && fvu < 1.0, "{family}: the SAE reconstructs nothing (FVU {fvu})");

    let build = ["features", "build", "--sae", &sae_dir, "--data", &data, "--out", &features, "--model", model];
    ok("features build", sae_with(&build, &format!("--top-k 3 --context 2 {threads}")));

    let prompt = "The old sailor went back to the sea.";
    let search = ["features", "search", "--sae", &sae_dir, "--features", &features, "--prompt", prompt, "--json"];
    let report = last_json(&ok("search", sae_with(&[&search[..], &["--model", model]].concat(), threads)));
    let tokens = report["tokens"].as_array().unwrap_or_else(|| panic!("{family}: {report}"));
    assert!(!tokens.is_empty(), "{family}: search found no token: {report}");
    assert!(
        tokens.iter().all(|t| !t["features"].as_array().unwrap().is_empty()),
        "{family}: a TopK SAE fires at every token: {report}"
    );

    let steer = ["steer", "--sae", &sae_dir, "--features", &features, "--feature", "0", "--clamp", "50x"];
    let more = ["--prompt", prompt, "--max-new-tokens", "8", "--json", "--model", model];
    let report = last_json(&ok("steer", sae_with(&[&steer[..], &more[..]].concat(), threads)));
    assert!(report["unsteered"].is_string() && report["steered"].is_string(), "{family}: {report}");
}

#[test]
fn every_stage_runs_on_each_tiny_family() {
    for family in FAMILIES {
        every_stage_runs_on(family);
    }
}

/// A hook past a tiny model's 3 blocks is refused, naming the hook and the model's range.
#[test]
fn a_hook_past_the_last_block_names_the_range_of_each_family() {
    for family in FAMILIES {
        let model = tiny_model(family);
        let out = sae(&["activations", "--hook", "blocks.3.hook_resid_post", "--prompt", "hi", "--model"]
            .into_iter()
            .chain([model.to_str().unwrap()])
            .collect::<Vec<_>>());
        let err = stderr(&out);
        assert!(!out.status.success(), "{family}: a hook past the last block was accepted");
        assert!(err.contains("blocks.3.hook_resid_post") && err.contains("0..=2"), "{family}: {err}");
    }
}
