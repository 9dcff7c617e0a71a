//! The `sae` binary as a user runs it: output on stdout, clear errors and non-zero exits.

use std::process::Command;

use capture::gguf::{GgmlType, GgufBuilder, Value};

mod common;
use common::{sae, stderr};

/// Runs `sae` with `args`, which must fail, and returns its stderr.
fn sae_error(args: &[&str]) -> String {
    let out = sae(args);
    assert!(!out.status.success(), "sae {args:?} succeeded");
    stderr(&out)
}

#[test]
fn generate_from_a_clean_environment_continues_with_paris() {
    // No environment at all: the binary must find libtorch (rpath) and the default model by itself.
    let out = Command::new(env!("CARGO_BIN_EXE_sae"))
        .env_clear()
        .args(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--threads", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with(" Paris"), "continuation was {stdout:?}");
    assert!(!stdout.contains("The capital"), "stdout must hold only the continuation: {stdout:?}");
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let err = sae_error(&["generate", "--prompt", "hi", "--model", "/nonexistent/model.gguf"]);
    assert!(err.contains("/nonexistent/model.gguf") && err.contains("does not exist"), "{err}");
}

#[test]
fn a_file_that_is_not_gguf_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-model.gguf");
    std::fs::write(&path, b"this is not a model at all").unwrap();
    let err = sae_error(&["generate", "--prompt", "hi", "--model", path.to_str().unwrap()]);
    assert!(err.contains("not-a-model.gguf") && err.contains("not a GGUF file"), "{err}");
}

#[test]
fn unsupported_gguf_type_names_the_tensor_and_type() {
    let string = |s: &str| Value::String(s.into());
    let image = GgufBuilder::default()
        .metadata("general.architecture", string("llama"))
        .metadata("llama.block_count", Value::U32(1))
        .metadata("llama.embedding_length", Value::U32(256))
        .metadata("llama.feed_forward_length", Value::U32(512))
        .metadata("llama.attention.head_count", Value::U32(4))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .metadata("tokenizer.ggml.model", string("gpt2"))
        .metadata("tokenizer.ggml.tokens", Value::Array(vec![string("a"), string("b"), string("ab")]))
        .metadata("tokenizer.ggml.merges", Value::Array(vec![string("a b")]))
        // Q4_K: 144 bytes per 256 elements.
        .tensor("token_embd.weight", &[3, 256], GgmlType::Other(12), vec![0; 3 * 144])
        .build();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4k.gguf");
    std::fs::write(&path, image).unwrap();
    let err = sae_error(&["generate", "--prompt", "ab", "--model", path.to_str().unwrap()]);
    assert!(err.contains("token_embd.weight") && err.contains("Q4_K") && err.contains("not supported"), "{err}");
}

#[test]
fn unknown_hook_names_the_hook_and_the_valid_range() {
    let err = sae_error(&["activations", "--hook", "blocks.99.hook_resid_post", "--prompt", "hello"]);
    assert!(err.contains("blocks.99.hook_resid_post") && err.contains("0..=29"), "{err}");
}

#[test]
fn activations_json_reports_the_hook_statistics() {
    let out = sae(&[
        "activations",
        "--hook",
        "blocks.15.hook_resid_post",
        "--prompt",
        "The capital of France is Paris.",
        "--json",
        "--threads",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "stdout must be one JSON object: {stdout}");
    let stats: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(stats["hook"], "blocks.15.hook_resid_post");
    assert_eq!(stats["d_model"], 576);
    // 7 tokens, the first left out.
    assert_eq!(stats["rows"], 6);
    let median = stats["norm_median"].as_f64().unwrap();
    assert!(median > 1.0 && median.is_finite(), "median norm {median}");
    assert_eq!(stats["early_exit"], true);
}

/// `attn.hook_z` is `[batch, seq, heads, head_dim]`: one row per token of heads × head_dim values.
#[test]
fn activations_of_hook_z_are_one_row_per_token() {
    let prompt = "The capital of France is Paris.";
    let out = sae(&["activations", "--hook", "blocks.3.attn.hook_z", "--prompt", prompt, "--json", "--threads", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(stats["hook"], "blocks.3.attn.hook_z");
    assert_eq!(stats["d_model"], 9 * 64, "{stats}");
    assert_eq!(stats["rows"], 6, "{stats}");
}

#[test]
fn bad_device_and_dtype_are_refused() {
    let out = sae(&["generate", "--prompt", "hi", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown device \"tpu\""), "{}", stderr(&out));
    let out = sae(&["generate", "--prompt", "hi", "--device", "cpu", "--dtype", "f8"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown dtype \"f8\""), "{}", stderr(&out));
}

#[test]
fn capture_list_hooks_prints_every_hook_of_the_loaded_model_in_order() {
    let out = sae(&["capture", "--list-hooks", "--threads", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let hooks: Vec<&str> = stdout.lines().collect();
    // SmolLM2-135M: 30 blocks of six hooks, between the embedding and the final norm.
    assert_eq!(hooks.len(), 2 + 6 * 30, "{stdout}");
    assert_eq!(hooks[..4], ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out"]);
    assert!(hooks.contains(&"blocks.15.hook_resid_mid"));
    assert_eq!(hooks.last(), Some(&"ln_final.hook_normalized"));
}
