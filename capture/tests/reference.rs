//! Our model and tokenizer against Hugging Face transformers on the same GGUF file, in f32.
//! `scripts/reference_hf.py` produces the reference once per test binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use capture::generate::{generate, GenerateOptions};
use capture::{Hooks, Model};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const LOGIT_PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village at the edge of the forest, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Die Hauptstadt von Deutschland ist Berlin, und die von Spanien ist",
];

const TOKENIZE_TEXTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, costs $12,345.67!",
    "Schöne Grüße aus München! Die Straße ist überfüllt, oder?",
    "¿Dónde está la biblioteca? Mañana iré a la señora Núñez.",
    "我爱北京天安门，天安门上太阳升。",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{v:?}\");\n}\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "   leading spaces, tabs\tand\n\nnewlines  ",
];

const GENERATE_PROMPTS: &[&str] = &["The capital of France is", "Once upon a time, there was a little"];
const GENERATE_TOKENS: usize = 16;

struct Reference {
    _dir: tempfile::TempDir,
    json: Value,
    logits: Vec<(String, Tensor)>,
    hf_folder: PathBuf,
}

// Tensor is not Sync; the reference is only read, from one test at a time through the model lock.
struct Shared(Reference);
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Shared> = OnceLock::new();
    &REFERENCE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let requests = serde_json::json!({
                "logits": LOGIT_PROMPTS,
                "tokenize": TOKENIZE_TEXTS,
                "generate": GENERATE_PROMPTS.iter().map(|p| serde_json::json!({"prompt": p, "max_new_tokens": GENERATE_TOKENS})).collect::<Vec<_>>(),
            });
            let req_path = dir.path().join("requests.json");
            std::fs::write(&req_path, requests.to_string()).unwrap();
            let hf_folder = dir.path().join("hf");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference_hf.py");
            let out = Command::new(common::python())
                .arg(&script)
                .arg("--gguf")
                .arg(common::model_path())
                .arg("--requests")
                .arg(&req_path)
                .arg("--out")
                .arg(dir.path())
                .arg("--export-hf")
                .arg(&hf_folder)
                .output()
                .expect("cannot run the venv's python (run `make setup`)");
            assert!(out.status.success(), "reference script failed:\n{}", String::from_utf8_lossy(&out.stderr));
            let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("reference.json")).unwrap()).unwrap();
            let logits = Tensor::read_safetensors(dir.path().join("logits.safetensors")).unwrap();
            Shared(Reference { _dir: dir, json, logits, hf_folder })
        })
        .0
}

fn as_ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn reference_logits(i: usize) -> &'static Tensor {
    let name = format!("logits.{i}");
    &reference().logits.iter().find(|(n, _)| *n == name).unwrap().1
}

/// Max over positions of ‖ours − theirs‖ / ‖theirs‖, per position over the vocabulary.
fn max_relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    let diff = (ours - theirs).norm_scalaropt_dim(2, [-1], false);
    let scale = theirs.norm_scalaropt_dim(2, [-1], false);
    (diff / scale).max().double_value(&[])
}

#[test]
fn token_ids_equal_transformers_in_four_languages_and_code() {
    let model = common::model();
    let expected = reference().json["tokenize"].as_array().unwrap();
    for (text, expected) in TOKENIZE_TEXTS.iter().zip(expected) {
        assert_eq!(model.tokenizer.encode(text).unwrap(), as_ids(expected), "token ids differ for {text:?}");
    }
    // Decoding gives the text back.
    for text in TOKENIZE_TEXTS {
        let ids = model.tokenizer.encode(text).unwrap();
        assert_eq!(&model.tokenizer.decode(&ids).unwrap(), text);
    }
}

#[test]
fn logits_match_transformers_at_every_position() {
    let model = common::model();
    for (i, prompt) in LOGIT_PROMPTS.iter().enumerate() {
        let ids = model.tokenizer.encode(prompt).unwrap();
        assert_eq!(ids, as_ids(&reference().json["logits"][i]), "tokenization differs for {prompt:?}");
        let ours = model
            .network
            .forward(&common::ids(&ids), None, &mut Hooks::new(), true)
            .unwrap()
            .logits
            .unwrap()
            .squeeze_dim(0);
        let theirs = reference_logits(i);
        assert_eq!(ours.size(), theirs.size());
        let err = max_relative_error(&ours, theirs);
        let max_abs = (&ours - theirs).abs().max().double_value(&[]);
        eprintln!("prompt {i}: max relative logit error {err:.3e}, max absolute difference {max_abs:.3e}");
        assert!(err <= 1e-3, "prompt {prompt:?}: relative logit error {err:.3e} > 1e-3");
    }
}

#[test]
fn greedy_tokens_match_where_the_margin_is_clear() {
    let model = common::model();
    for (prompt, reference) in GENERATE_PROMPTS.iter().zip(reference().json["generate"].as_array().unwrap()) {
        let prompt_ids = model.tokenizer.encode(prompt).unwrap();
        assert_eq!(prompt_ids, as_ids(&reference["prompt_ids"]));
        let theirs = as_ids(&reference["tokens"]);
        let margins: Vec<f64> = reference["margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();

        // Teacher-forced over their sequence, so every step is compared.
        let sequence: Vec<u32> = prompt_ids.iter().chain(&theirs).copied().collect();
        let logits =
            model.network.forward(&common::ids(&sequence), None, &mut Hooks::new(), true).unwrap().logits.unwrap();
        for (step, (&token, &margin)) in theirs.iter().zip(&margins).enumerate() {
            let ours = logits.get(0).get((prompt_ids.len() + step - 1) as i64).argmax(0, false).int64_value(&[]) as u32;
            if margin > 0.05 {
                assert_eq!(ours, token, "{prompt:?} step {step}: margin {margin:.3}");
            }
        }

        // Our own KV-cached decoding follows theirs until a step whose margin is too thin to call.
        let opts = GenerateOptions { max_new_tokens: GENERATE_TOKENS, temperature: 0.0, seed: 0, stop_at_eos: false };
        let ours = generate(&model, &prompt_ids, &opts, &mut Hooks::new(), |_| Ok::<_, capture::Error>(())).unwrap();
        for (step, ((&a, &b), &margin)) in ours.iter().zip(&theirs).zip(&margins).enumerate() {
            if margin <= 0.05 {
                break;
            }
            assert_eq!(a, b, "{prompt:?}: cached generation differs at step {step}");
        }
    }
    // The acceptance example.
    let text = reference().json["generate"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "transformers' continuation is {text:?}");
}

#[test]
fn hugging_face_folder_loads_the_same_model() {
    let gguf = common::model();
    let folder = &reference().hf_folder;
    assert!(folder.join("model.safetensors.index.json").exists(), "the export should be sharded");
    let hf = Model::load(folder, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(hf.network.n_layers(), 30);
    let ids = gguf.tokenizer.encode(LOGIT_PROMPTS[1]).unwrap();
    let a = gguf.network.forward(&common::ids(&ids), None, &mut Hooks::new(), true).unwrap().logits.unwrap();
    let b = hf.network.forward(&common::ids(&ids), None, &mut Hooks::new(), true).unwrap().logits.unwrap();
    let err = max_relative_error(&a, &b);
    assert!(err <= 1e-5, "GGUF and safetensors loads differ: {err:.3e}");
    // The exported tokenizer.json is transformers' own, which prepends BOS; otherwise the ids agree.
    let hf_ids = hf.tokenizer.encode(LOGIT_PROMPTS[1]).unwrap();
    let expected: Vec<u32> = if hf.tokenizer.add_bos {
        hf.tokenizer.bos_id.into_iter().chain(ids.iter().copied()).collect()
    } else {
        ids.clone()
    };
    assert_eq!(hf_ids, expected);
}
