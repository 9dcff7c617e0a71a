//! Every supported model family against transformers, on a tiny randomly initialised model that
//! transformers itself makes (`scripts/tiny_models.py`, cached under
//! `$SAE_CACHE/tiny-models/<family>`): token ids, logits and every hook's activations on several
//! prompts and on a batch of packed windows, within 1e-4 relative, and greedy generation token for
//! token. Families we do not implement must be refused, never run approximately.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capture::generate::{generate, GenerateOptions};
use capture::{HookPoint, Hooks, Model};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village at the edge of the forest, there lived a fox who",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Schöne Grüße aus München! 我爱北京天安门。",
];
const TOKENIZE: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, costs $12,345.67!",
    "¿Dónde está la biblioteca? Mañana iré a la señora Núñez.",
    "   leading spaces, tabs\tand\n\nnewlines  ",
    "<|eos|> special <|bos|> tokens",
];
const GENERATE_PROMPTS: &[&str] = &["Simple is better", "Errors should never"];
const GENERATE_TOKENS: usize = 12;
/// Packed windows: the prompts' ids joined by EOS, cut into `BATCH_WINDOWS` windows of `BATCH_LEN`.
const BATCH_WINDOWS: usize = 3;
const BATCH_LEN: usize = 16;
/// The bound: ‖ours − theirs‖ / ‖theirs‖ at every position, for logits and every hook.
const TOLERANCE: f64 = 1e-4;
/// Greedy steps whose top-2 logit margin is below this are too close to call in f32.
const MIN_MARGIN: f64 = 1e-3;

/// Makes (or reuses) the family's folder; with `requests`, also transformers' outputs in `out`.
fn run_script(family: &str, requests: Option<(&Value, &Path)>) -> PathBuf {
    let mut cmd = testkit::tiny_models_script(family);
    if let Some((requests, out)) = requests {
        let path = out.join("requests.json");
        std::fs::write(&path, requests.to_string()).unwrap();
        cmd.arg("--requests").arg(&path).arg("--out").arg(out);
    }
    testkit::run_tiny_models_script(cmd);
    testkit::tiny_model_dir(family)
}

struct Reference {
    json: Value,
    tensors: BTreeMap<String, Tensor>,
}

impl Reference {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("the reference has no tensor {name}"))
    }
}

fn reference(family: &str, out: &Path) -> (PathBuf, Reference) {
    let requests = json!({
        "prompts": PROMPTS,
        "tokenize": TOKENIZE,
        "batch": {"windows": BATCH_WINDOWS, "len": BATCH_LEN},
        "generate": {"prompts": GENERATE_PROMPTS, "max_new_tokens": GENERATE_TOKENS},
    });
    let dir = run_script(family, Some((&requests, out)));
    let json = serde_json::from_str(&std::fs::read_to_string(out.join("reference.json")).unwrap()).unwrap();
    let tensors = Tensor::read_safetensors(out.join("tensors.safetensors")).unwrap().into_iter().collect();
    (dir, Reference { json, tensors })
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Max over positions of ‖ours − theirs‖ / ‖theirs‖; both are `[positions..., features...]` with
/// `batch_dims` leading position dimensions.
fn max_relative_error(ours: &Tensor, theirs: &Tensor, batch_dims: usize) -> f64 {
    assert_eq!(ours.size(), theirs.size(), "shapes differ");
    let positions: i64 = theirs.size()[..batch_dims].iter().product();
    let (ours, theirs) =
        (ours.to_kind(Kind::Double).reshape([positions, -1]), theirs.to_kind(Kind::Double).reshape([positions, -1]));
    let diff = (&ours - &theirs).norm_scalaropt_dim(2, [-1], false);
    let scale = theirs.norm_scalaropt_dim(2, [-1], false).clamp_min(1e-30);
    (diff / scale).max().double_value(&[])
}

/// Our logits and every hook's tensor for `ids` `[batch, seq]`.
fn run_ours(model: &Model, ids: &Tensor) -> (Tensor, BTreeMap<HookPoint, Tensor>) {
    let mut hooks = Hooks::new().capture(model.network.hook_points());
    let out = model.network.forward(ids, None, &mut hooks, true).unwrap();
    (out.logits.unwrap(), out.hooks)
}

/// Compares one family end to end and prints the largest relative error per hook.
fn check_family(family: &str) {
    tch::set_num_threads(common::THREADS);
    let out = tempfile::tempdir().unwrap();
    let (dir, reference) = reference(family, out.path());
    let model = Model::load(&dir, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{family}: {e:#}"));

    // Hook names: ours are transformers' modules mapped to TransformerLens's names, in order.
    let names: Vec<String> = model.network.hook_points().iter().map(|h| h.to_string()).collect();
    let expected: Vec<String> =
        reference.json["hooks"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_owned()).collect();
    assert_eq!(names, expected, "{family}: hook names");

    for (text, theirs) in TOKENIZE.iter().zip(reference.json["tokenize"].as_array().unwrap()) {
        assert_eq!(model.tokenizer.encode(text).unwrap(), ids_of(theirs), "{family}: token ids of {text:?}");
    }

    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut note = |name: String, err: f64| {
        // f64::max drops a NaN, which would then pass unseen.
        assert!(err.is_finite(), "{family}: {name}: relative error {err}");
        let e = worst.entry(name).or_insert(0.0);
        *e = e.max(err);
    };
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = model.tokenizer.encode(prompt).unwrap();
        assert_eq!(ids, ids_of(&reference.json["prompts"][i]), "{family}: token ids of {prompt:?}");
        let (logits, hooks) = run_ours(&model, &common::ids(&ids));
        note("logits".into(), max_relative_error(&logits.squeeze_dim(0), reference.tensor(&format!("logits.{i}")), 1));
        for (hook, ours) in hooks {
            let theirs = reference.tensor(&format!("{hook}.{i}"));
            note(hook.to_string(), max_relative_error(&ours.squeeze_dim(0), theirs, 1));
        }
    }
    let batch: Vec<i64> = reference.json["batch"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    let batch = Tensor::from_slice(&batch).view([BATCH_WINDOWS as i64, BATCH_LEN as i64]);
    let (logits, hooks) = run_ours(&model, &batch);
    note("logits (batch)".into(), max_relative_error(&logits, reference.tensor("logits.batch"), 2));
    for (hook, ours) in &hooks {
        note(format!("{hook} (batch)"), max_relative_error(ours, reference.tensor(&format!("{hook}.batch")), 2));
    }
    if family != "gpt2" && !family.starts_with("gpt_neox") {
        check_final_norm_gain(family, &model, &dir, &hooks);
    }
    for (name, err) in &worst {
        eprintln!("{family:<8} {name:<40} max relative error {err:.2e}");
    }
    for (name, err) in &worst {
        assert!(*err <= TOLERANCE, "{family}: {name} differs from transformers by {err:.3e} > {TOLERANCE:e}");
    }

    check_greedy(family, &model, &reference);
}

/// The gain that features' logit effects multiply decoder rows by is the one the final norm
/// applies: the RMS-normalized last residual times `final_norm_gain` is the `ln_final` hook
/// (Gemma stores its norm weights as offsets from 1, so its gain is `1 + w`).
fn check_final_norm_gain(family: &str, model: &Model, dir: &Path, hooks: &BTreeMap<HookPoint, Tensor>) {
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let eps = config["rms_norm_eps"].as_f64().unwrap_or_else(|| panic!("{family}: no rms_norm_eps"));
    let last = hooks[&HookPoint::ResidPost(model.network.n_layers() - 1)].to_kind(Kind::Double); // [b, t, d]
    let normalized = &last / (last.square().mean_dim(-1, true, Kind::Double) + eps).sqrt();
    let ours = normalized * model.network.final_norm_gain().to_kind(Kind::Double);
    let err = max_relative_error(&ours, &hooks[&HookPoint::LnFinal], 2);
    assert!(err < 1e-4, "{family}: the final norm's gain does not give ln_final (relative error {err:.2e})");
}

/// Our KV-cached greedy decoding gives transformers' tokens, up to a step too close to call.
fn check_greedy(family: &str, model: &Model, reference: &Reference) {
    let mut compared = 0;
    for (prompt, theirs) in GENERATE_PROMPTS.iter().zip(reference.json["generate"].as_array().unwrap()) {
        let prompt_ids = model.tokenizer.encode(prompt).unwrap();
        assert_eq!(prompt_ids, ids_of(&theirs["prompt_ids"]), "{family}: token ids of {prompt:?}");
        let tokens = ids_of(&theirs["tokens"]);
        let opts = GenerateOptions { max_new_tokens: GENERATE_TOKENS, temperature: 0.0, seed: 0, stop_at_eos: false };
        let ours = generate(model, &prompt_ids, &opts, &mut Hooks::new(), |_| Ok::<_, capture::Error>(())).unwrap();
        for (step, ((a, b), margin)) in ours.iter().zip(&tokens).zip(theirs["margins"].as_array().unwrap()).enumerate()
        {
            if margin.as_f64().unwrap() < MIN_MARGIN {
                eprintln!("{family}: {prompt:?} step {step} has margin {margin}; stopping the comparison there");
                break;
            }
            assert_eq!(a, b, "{family}: greedy token {step} after {prompt:?}");
            compared += 1;
        }
    }
    eprintln!("{family:<8} greedy: {compared} tokens equal to transformers'");
    assert!(compared >= GENERATE_TOKENS, "{family}: only {compared} greedy steps had a clear margin");
}

#[test]
fn llama_matches_transformers() {
    check_family("llama");
}

#[test]
fn llama3_with_rope_scaling_matches_transformers() {
    check_family("llama3");
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    check_family("mistral");
}

#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

#[test]
fn gpt_neox_with_parallel_attention_and_partial_rotary_matches_transformers() {
    check_family("gpt_neox");
}

#[test]
fn gpt_neox_without_parallel_attention_matches_transformers() {
    check_family("gpt_neox_sequential");
}

#[test]
fn gemma2_with_soft_capping_and_sliding_windows_matches_transformers() {
    check_family("gemma2");
}

#[test]
fn a_family_not_implemented_is_refused_by_name() {
    // Gemma (1) has Llama's tensor names and shapes: loaded as Llama it would run, wrongly.
    let dir = run_script("gemma", None);
    let err = format!("{:#}", Model::load(&dir, Device::Cpu, Kind::Float).err().expect("must be refused"));
    assert!(err.contains("\"gemma\"") && err.contains("config.json"), "{err}");
    assert!(err.contains("llama (LlamaForCausalLM)") && err.contains("gemma2 (Gemma2ForCausalLM)"), "{err}");
}

/// A copy of the family's folder whose config.json has `edit` applied.
fn edited_copy(family: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let source = run_script(family, None);
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = copy.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    copy
}

#[test]
fn settings_we_do_not_compute_are_refused_by_field() {
    type ConfigEdit = Box<dyn FnOnce(&mut Value)>;
    let cases: [(&str, &str, ConfigEdit); 4] = [
        ("llama3", "rope_scaling", Box::new(|c| c["rope_scaling"]["rope_type"] = json!("yarn"))),
        ("llama", "hidden_act", Box::new(|c| c["hidden_act"] = json!("gelu"))),
        ("qwen2", "layer_types", Box::new(|c| c["layer_types"] = json!(["full_attention"]))),
        ("llama", "architectures", Box::new(|c| c["architectures"] = json!(["Gemma2ForCausalLM"]))),
    ];
    for (family, field, edit) in cases {
        let copy = edited_copy(family, edit);
        let err = format!("{:#}", Model::load(copy.path(), Device::Cpu, Kind::Float).err().expect("must be refused"));
        let named = if field == "architectures" { "Gemma2ForCausalLM" } else { field };
        assert!(err.contains(named), "{family} with {field} edited: {err}");
    }
}

/// Writes `weights` to `dir` as two safetensors shards with a `model.safetensors.index.json`.
fn write_sharded(dir: &Path, weights: &[(String, Tensor)]) {
    let (first, second) = weights.split_at(weights.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        Tensor::write_safetensors(part, dir.join(file)).unwrap();
        for (name, _) in part {
            map.insert(name.clone(), json!(file));
        }
    }
    std::fs::write(dir.join("model.safetensors.index.json"), json!({"weight_map": map}).to_string()).unwrap();
}

#[test]
fn bf16_sharded_weights_load_and_stay_close_to_f32() {
    tch::set_num_threads(common::THREADS);
    let source = run_script("qwen2", None);
    let f32_model = Model::load(&source, Device::Cpu, Kind::Float).unwrap();
    let copy = tempfile::tempdir().unwrap();
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(source.join(name), copy.path().join(name)).unwrap();
    }
    let weights: Vec<(String, Tensor)> = Tensor::read_safetensors(source.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.to_kind(Kind::BFloat16)))
        .collect();
    write_sharded(copy.path(), &weights);

    let ids = common::ids(&f32_model.tokenizer.encode(PROMPTS[1]).unwrap());
    let reference = run_ours(&f32_model, &ids).0;
    // The same bf16 weights computed in f32 and in bf16: both near the f32 model, the f32
    // computation nearer.
    let widened = Model::load(copy.path(), Device::Cpu, Kind::Float).unwrap();
    let bf16 = Model::load(copy.path(), Device::Cpu, Kind::BFloat16).unwrap();
    assert_eq!(bf16.network.unembedding().kind(), Kind::BFloat16);
    let widened_err = max_relative_error(&run_ours(&widened, &ids).0, &reference, 2);
    let bf16_err = max_relative_error(&run_ours(&bf16, &ids).0, &reference, 2);
    eprintln!("bf16 weights: relative logit error {widened_err:.2e} computed in f32, {bf16_err:.2e} in bf16");
    assert!(widened_err > 0.0 && widened_err < 2e-2, "{widened_err}");
    assert!(bf16_err < 5e-2, "{bf16_err}");
}
