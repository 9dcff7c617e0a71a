//! `sae features build/search/neighbors/browse/export`, `sae steer` and `sae run` on a real small
//! SAE trained on real activations of SmolLM2: each reported number is checked against a
//! brute-force computation done here with the library crates directly. One test binary, so the
//! SAE and its features folder (the fixture, below) are built once for every file.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

use arrow_array::{Array, Float32Array, ListArray, RecordBatch, StringArray, UInt32Array, UInt64Array};
use capture::{HookPoint, Hooks};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use store::reader::{Reader, ReaderOptions};
use tch::{Device, Kind, Tensor};
use trainer::export::LoadedSae;

#[path = "../common/mod.rs"]
mod common;
use common::{last_json, model, sae, sae_with, scratch, stderr, stdout, S3Server};
use testkit::chromium_dom;

mod build;
mod errors;
mod export;
mod run;
mod s3;
mod search;
mod steer;

const SAE_BIN: &str = env!("CARGO_BIN_EXE_sae");
const HOOK: &str = "blocks.15.hook_resid_post";

struct Fixture {
    data: String,
    sae: String,
    features: String,
}

/// 8,000 rows of layer-15 activations over the English fortunes, a TopK SAE (1152 latents,
/// k = 16) trained on them, and its features (top 5, ±4 tokens).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let data = scratch("data").display().to_string();
        let out = sae_with(
            &["capture", "--out", &data],
            "--max-tokens 8000 --context-len 64 --batch-size 4 --row-group-rows 512",
        );
        assert!(out.status.success(), "capture failed: {}", stderr(&out));
        let sae_dir = scratch("sae").display().to_string();
        let out = sae_with(
            &["train", "--data", &data, "--out", &sae_dir],
            "--latents 1152 --k 16 --batch-size 256 --max-tokens 16384 --lr 1e-3 --no-eval --quiet",
        );
        assert!(out.status.success(), "train failed: {}", stderr(&out));
        let features = scratch("features").display().to_string();
        let out = sae_with(
            &["features", "build", "--sae", &sae_dir, "--data", &data, "--out", &features],
            "--top-k 5 --context 4 --chunk-rows 1000",
        );
        assert!(out.status.success(), "features build failed: {}", stderr(&out));
        Fixture { data, sae: sae_dir, features }
    })
}

fn load_sae(dir: &str) -> LoadedSae {
    let cfg = std::fs::read(Path::new(dir).join("cfg.json")).unwrap();
    let weights = std::fs::read(Path::new(dir).join("sae_weights.safetensors")).unwrap();
    trainer::export::load(&cfg, &weights, dir, Device::Cpu).unwrap()
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().map(Result::unwrap).collect()
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).as_any().downcast_ref::<T>().unwrap()
}

fn sae_ok(args: &[&str]) -> Output {
    let out = sae(args);
    assert!(out.status.success(), "sae {args:?} failed: {}", stderr(&out));
    out
}

const PROMPT: &str = "The stock market crashed, and the old sailor went back to the sea.";

/// `prompt`'s token ids, the same ids as a `[1, seq]` tensor, and [`HOOK`] in the model.
fn prompt_on_model(model: &capture::Model, prompt: &str) -> (Vec<u32>, Tensor, HookPoint) {
    let ids = model.tokenizer.encode(prompt).unwrap();
    let tokens = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    (ids, tokens, HookPoint::parse(HOOK, 30).unwrap())
}

#[derive(Debug)]
struct Ex {
    feature: u32,
    kind: String,
    band: u32,
    activation: f32,
    sequence_id: u64,
    position: u32,
    center: u32,
    token_ids: Vec<u32>,
    token_activations: Vec<f32>,
}

fn examples(f: &Fixture) -> Vec<Ex> {
    let mut out = Vec::new();
    for b in read_parquet(&Path::new(&f.features).join("examples.parquet")) {
        let (token_ids, acts) = (col::<ListArray>(&b, "token_ids"), col::<ListArray>(&b, "token_activations"));
        for i in 0..b.num_rows() {
            out.push(Ex {
                feature: col::<UInt32Array>(&b, "feature").value(i),
                kind: col::<StringArray>(&b, "kind").value(i).to_string(),
                band: col::<UInt32Array>(&b, "band").value(i),
                activation: col::<Float32Array>(&b, "activation").value(i),
                sequence_id: col::<UInt64Array>(&b, "sequence_id").value(i),
                position: col::<UInt32Array>(&b, "position").value(i),
                center: col::<UInt32Array>(&b, "center").value(i),
                token_ids: token_ids.value(i).as_any().downcast_ref::<UInt32Array>().unwrap().values().to_vec(),
                token_activations: acts.value(i).as_any().downcast_ref::<Float32Array>().unwrap().values().to_vec(),
            });
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * (1.0 + a.abs().max(b.abs()))
}

/// Every feature's dataset maximum and density, from the features folder's `features.parquet`.
fn dataset_scales(f: &Fixture) -> (Vec<f32>, Vec<f64>) {
    let (mut max, mut density) = (Vec::new(), Vec::new());
    for b in read_parquet(&Path::new(&f.features).join("features.parquet")) {
        max.extend(col::<Float32Array>(&b, "max_activation").values().iter());
        density.extend(col::<arrow_array::Float64Array>(&b, "frequency").values().iter());
    }
    (max, density)
}
