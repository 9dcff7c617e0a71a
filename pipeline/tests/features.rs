//! `sae features build/search/neighbors/browse`, `sae steer` and `sae run` on a real small SAE
//! trained on real activations of SmolLM2: each reported number is checked against a brute-force
//! computation done here with the library crates directly.

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

mod common;
use common::{last_json, model, sae, sae_with, scratch, stderr, stdout, S3Server};
use testkit::chromium_dom;

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

/// Every row of the dataset in stored order: latents [rows, d_sae] and (sequence_id, position, token_id).
fn brute_force_latents(f: &Fixture, sae: &LoadedSae) -> (Tensor, Vec<(u64, u32, u32)>) {
    let mut opts = ReaderOptions::one_pass_in_order(HOOK, 1024);
    opts.with_tokens = true;
    let mut z = Vec::new();
    let mut ids = Vec::new();
    for batch in Reader::open(&f.data, opts).unwrap() {
        let batch = batch.unwrap();
        let x = Tensor::from_slice(&batch.to_f32()).view([batch.rows as i64, batch.d as i64]);
        z.push(sae.sae.encode(&x).unwrap());
        let t = batch.tokens.as_ref().unwrap();
        ids.extend((0..batch.rows).map(|i| (t.sequence_id[i], t.position[i], t.token_id[i])));
    }
    (Tensor::cat(&z, 0), ids)
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().map(Result::unwrap).collect()
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).as_any().downcast_ref::<T>().unwrap()
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

#[test]
fn top_examples_statistics_and_windows_equal_a_brute_force_pass() {
    let f = fixture();
    let sae = load_sae(&f.sae);
    let (z, ids) = brute_force_latents(f, &sae);
    let rows = z.size()[0];
    let d_sae = z.size()[1];
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&f.features).join("features.json")).unwrap()).unwrap();
    assert_eq!(summary["rows"].as_i64(), Some(rows));

    // Per-feature statistics.
    let fired = Vec::<i64>::try_from(z.gt(0.0).sum_dim_intlist(0, false, Kind::Int64)).unwrap();
    let max = Vec::<f32>::try_from(z.amax(0, false)).unwrap();
    let stats = read_parquet(&Path::new(&f.features).join("features.parquet"));
    let mut seen = 0;
    for b in &stats {
        for i in 0..b.num_rows() {
            let feature = col::<UInt32Array>(b, "feature").value(i) as usize;
            assert_eq!(col::<UInt64Array>(b, "fired").value(i) as i64, fired[feature], "feature {feature}");
            assert!(
                close(col::<Float32Array>(b, "max_activation").value(i) as f64, max[feature] as f64),
                "feature {feature}"
            );
            let hist = col::<ListArray>(b, "histogram").value(i);
            let total: u32 = hist.as_any().downcast_ref::<UInt32Array>().unwrap().values().iter().sum();
            assert_eq!(total as i64, fired[feature], "the histogram of feature {feature} counts every firing");
            seen += 1;
        }
    }
    assert_eq!(seen, d_sae);
    let dead: Vec<i64> = summary["dead"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let want_dead: Vec<i64> = (0..d_sae).filter(|&i| fired[i as usize] == 0).collect();
    assert_eq!(dead, want_dead);

    // Top examples: the brute-force top 5 activations of every feature, and each example's
    // window re-encoded from the dataset's rows.
    let (top_values, _) = z.topk(5, 0, true, true);
    let top_values = Vec::<f32>::try_from(top_values.transpose(0, 1).contiguous().flatten(0, -1)).unwrap();
    let row_of: HashMap<(u64, u32), usize> = ids.iter().enumerate().map(|(r, &(s, p, _))| ((s, p), r)).collect();
    let mut by_feature: HashMap<u32, Vec<&Ex>> = HashMap::new();
    let all = examples(f);
    for e in &all {
        by_feature.entry(e.feature).or_default().push(e);
        let centre = row_of[&(e.sequence_id, e.position)];
        assert!(close(z.double_value(&[centre as i64, e.feature as i64]), e.activation as f64), "{e:?}");
        for (j, (&token, &act)) in e.token_ids.iter().zip(&e.token_activations).enumerate() {
            let position = e.position as i64 + j as i64 - e.center as i64;
            let r = row_of[&(e.sequence_id, position as u32)];
            assert_eq!(ids[r].2, token, "token {j} of {e:?}");
            assert!(close(z.double_value(&[r as i64, e.feature as i64]), act as f64), "activation {j} of {e:?}");
        }
        assert!(e.token_ids.len() <= 9);
    }
    let mut checked = 0;
    for feature in 0..d_sae as u32 {
        let tops: Vec<f32> = by_feature
            .get(&feature)
            .map_or(vec![], |v| v.iter().filter(|e| e.kind == "top").map(|e| e.activation).collect());
        let want: Vec<f32> =
            top_values[feature as usize * 5..feature as usize * 5 + 5].iter().copied().filter(|&v| v > 0.0).collect();
        assert_eq!(tops.len(), want.len(), "feature {feature}");
        for (a, b) in tops.iter().zip(&want) {
            assert!(close(*a as f64, *b as f64), "feature {feature}: {tops:?} vs {want:?}");
        }
        // Quantile samples fire, and higher bands hold higher activations.
        let quantiles: Vec<&&Ex> =
            by_feature.get(&feature).map_or(vec![], |v| v.iter().filter(|e| e.kind == "quantile").collect());
        for a in &quantiles {
            assert!(a.activation > 0.0);
            for b in &quantiles {
                if a.band < b.band {
                    assert!(a.activation <= b.activation, "feature {feature}: band {} > band {}", a.band, b.band);
                }
            }
        }
        checked += !tops.is_empty() as usize;
    }
    assert!(checked > 100, "only {checked} features fired");
}

#[test]
fn neighbors_match_brute_force_and_the_build() {
    let f = fixture();
    let sae = load_sae(&f.sae);
    let w = sae.sae.w_dec().detach();
    let unit = &w / w.norm_scalaropt_dim(2, [1], true);
    let feature = 17i64;
    let sims = Vec::<f32>::try_from(unit.mv(&unit.get(feature))).unwrap();
    assert!((sims[feature as usize] - 1.0).abs() < 1e-5, "a feature's similarity with itself is 1");
    let mut order: Vec<usize> = (0..sims.len()).filter(|&i| i != feature as usize).collect();
    order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]).then(a.cmp(&b)));
    let out = sae_ok(&["features", "neighbors", "--sae", &f.sae, "--feature", "17", "--top", "10", "--json"]);
    let got: Vec<usize> = last_json(&out)["neighbors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["feature"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(got, order[..10].to_vec());
    // The build's neighbours of the same feature agree.
    let stats = read_parquet(&Path::new(&f.features).join("features.parquet"));
    let b = &stats[0];
    let row = (0..b.num_rows()).find(|&i| col::<UInt32Array>(b, "feature").value(i) == 17).unwrap();
    let built: Vec<usize> = col::<ListArray>(b, "neighbors")
        .value(row)
        .as_any()
        .downcast_ref::<UInt32Array>()
        .unwrap()
        .values()
        .iter()
        .map(|&v| v as usize)
        .collect();
    assert_eq!(built, order[..10].to_vec());
    // Into another SAE (itself): the feature is its own nearest neighbour at cosine 1.
    let out = sae_ok(&[
        "features",
        "neighbors",
        "--sae",
        &f.sae,
        "--feature",
        "17",
        "--other-sae",
        &f.sae,
        "--top",
        "1",
        "--json",
    ]);
    let first = &last_json(&out)["neighbors"][0];
    assert_eq!(first["feature"].as_i64(), Some(17));
    assert!((first["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-5);
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

/// Latents of `prompt` encoded directly: tokenize, run to the hook, encode every position but the first.
fn encode_directly(sae: &LoadedSae, prompt: &str) -> (Vec<u32>, Tensor) {
    let model = model();
    let (ids, tokens, hook) = prompt_on_model(&model, prompt);
    let mut hooks = Hooks::new().capture([hook]);
    let acts = model.network.forward(&tokens, None, &mut hooks, false).unwrap().hooks[&hook].squeeze_dim(0);
    let z = sae.sae.encode(&acts.narrow(0, 1, ids.len() as i64 - 1)).unwrap();
    (ids, z)
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

fn search_json(f: &Fixture, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["features", "search", "--sae", &f.sae, "--prompt", PROMPT, "--features", &f.features, "--json"];
    args.extend(extra);
    last_json(&sae_ok(&args))
}

#[test]
fn search_ranks_by_activation_relative_to_the_dataset_maximum_as_a_direct_encode_gives() {
    let f = fixture();
    let out = sae_ok(&[
        "features",
        "search",
        "--sae",
        &f.sae,
        "--prompt",
        PROMPT,
        "--features",
        &f.features,
        "--per-token",
        "4",
        "--json",
    ]);
    let report = last_json(&out);
    assert!(stdout(&out).contains("logits ↑"), "with --features, features show their logit tokens:\n{}", stdout(&out));
    assert_eq!(report["ranked_by"], "relative");
    let sae = load_sae(&f.sae);
    let (ids, z) = encode_directly(&sae, PROMPT);
    let (dataset_max, density) = dataset_scales(f);
    let max_density = report["max_density"].as_f64().unwrap();
    assert_eq!(max_density, 0.02, "the default --max-density");
    // The rank key computed here: dense last, then relative activation descending, then id.
    let key =
        |feature: usize, v: f32| (density[feature] > max_density, -(v as f64 / dataset_max[feature] as f64), feature);

    let per_token = report["tokens"].as_array().unwrap();
    assert_eq!(per_token.len(), ids.len() - 1);
    for t in per_token {
        let position = t["position"].as_i64().unwrap();
        let row = Vec::<f32>::try_from(z.get(position - 1)).unwrap();
        let mut want: Vec<usize> = (0..row.len()).filter(|&i| row[i] > 0.0).collect();
        want.sort_by(|&a, &b| key(a, row[a]).partial_cmp(&key(b, row[b])).unwrap());
        want.truncate(4);
        let got: Vec<usize> =
            t["features"].as_array().unwrap().iter().map(|h| h["feature"].as_u64().unwrap() as usize).collect();
        assert_eq!(got, want, "position {position}");
        for hit in t["features"].as_array().unwrap() {
            let feature = hit["feature"].as_u64().unwrap() as usize;
            assert!(close(hit["activation"].as_f64().unwrap(), row[feature] as f64));
            let relative = row[feature] as f64 / dataset_max[feature] as f64;
            assert!(close(hit["relative_activation"].as_f64().unwrap(), relative), "position {position}");
        }
    }

    // Whole prompt: every firing feature, by the same key, the top 10 specific then the top 10 dense.
    let (max, _) = z.max_dim(0, false);
    let max = Vec::<f32>::try_from(max).unwrap();
    let mut firing: Vec<usize> = (0..max.len()).filter(|&i| max[i] > 0.0).collect();
    firing.sort_by(|&a, &b| key(a, max[a]).partial_cmp(&key(b, max[b])).unwrap());
    let (dense, specific): (Vec<usize>, Vec<usize>) = firing.iter().partition(|&&i| density[i] > max_density);
    let want: Vec<usize> = specific.iter().take(10).chain(dense.iter().take(10)).copied().collect();
    let hits = report["prompt_features"].as_array().unwrap();
    let got: Vec<usize> = hits.iter().map(|h| h["feature"].as_u64().unwrap() as usize).collect();
    assert_eq!(got, want);
    assert!(!dense.is_empty(), "no dense feature fires on the prompt, so the marking is not exercised");
    for hit in hits {
        let feature = hit["feature"].as_u64().unwrap() as usize;
        let column = z.select(1, feature as i64);
        assert!(close(hit["max_activation"].as_f64().unwrap(), max[feature] as f64));
        assert!(close(hit["relative_activation"].as_f64().unwrap(), max[feature] as f64 / dataset_max[feature] as f64));
        assert!(close(hit["dataset_max"].as_f64().unwrap(), dataset_max[feature] as f64));
        assert_eq!(hit["dense"].as_bool(), Some(density[feature] > max_density));
        assert_eq!(hit["tokens_fired"].as_i64(), Some(column.gt(0.0).sum(Kind::Int64).int64_value(&[])));
    }
    assert!(stdout(&out).contains("DENSE"), "{}", stdout(&out));

    // The threshold edge: at exactly a dense feature's density it is specific; just below, dense.
    let edge = dense[0];
    let at = density[edge].to_string();
    let report = search_json(f, &["--max-density", &at, "--top", "1000"]);
    let hit = report["prompt_features"].as_array().unwrap().iter().find(|h| h["feature"] == edge).cloned();
    assert_eq!(hit.map(|h| h["dense"].clone()), Some(serde_json::Value::Bool(false)), "at --max-density {at}");
    let below = (density[edge] * (1.0 - 1e-9)).to_string();
    let report = search_json(f, &["--max-density", &below, "--top", "1000"]);
    let hit = report["prompt_features"].as_array().unwrap().iter().find(|h| h["feature"] == edge).cloned().unwrap();
    assert_eq!(hit["dense"], true, "at --max-density {below}");
}

#[test]
fn search_without_features_ranks_by_raw_activation() {
    let f = fixture();
    let report =
        last_json(&sae_ok(&["features", "search", "--sae", &f.sae, "--prompt", PROMPT, "--per-token", "4", "--json"]));
    assert_eq!(report["ranked_by"], "raw");
    let (_, z) = encode_directly(&load_sae(&f.sae), PROMPT);
    for t in report["tokens"].as_array().unwrap() {
        let position = t["position"].as_i64().unwrap();
        let (want_values, want_ids) = z.get(position - 1).topk(4, 0, true, true);
        let want_ids = Vec::<i64>::try_from(want_ids).unwrap();
        let want_values = Vec::<f32>::try_from(want_values).unwrap();
        let got = t["features"].as_array().unwrap();
        assert_eq!(got.len(), want_values.iter().filter(|&&v| v > 0.0).count());
        for (j, hit) in got.iter().enumerate() {
            assert_eq!(hit["feature"].as_i64(), Some(want_ids[j]), "position {position}");
            assert!(close(hit["activation"].as_f64().unwrap(), want_values[j] as f64));
            assert!(hit["relative_activation"].is_null());
        }
    }
    let (max, _) = z.max_dim(0, false);
    let (best, order) = max.topk(10, 0, true, true);
    let want: Vec<i64> = Vec::<i64>::try_from(order)
        .unwrap()
        .into_iter()
        .zip(Vec::<f32>::try_from(best).unwrap())
        .filter(|(_, v)| *v > 0.0)
        .map(|(f, _)| f)
        .collect();
    let got: Vec<i64> =
        report["prompt_features"].as_array().unwrap().iter().map(|h| h["feature"].as_i64().unwrap()).collect();
    assert_eq!(got, want);
}

#[test]
fn compare_lists_the_features_of_every_prompt_as_a_brute_force_encode_of_each_gives() {
    let f = fixture();
    let prompts =
        ["I love to eat bread and cheese.", "The old sailor ate bread and cheese at sea.", "Bread and cheese, please!"];
    let mut args = vec!["features", "compare", "--sae", &f.sae, "--features", &f.features, "--top", "1000", "--json"];
    for p in &prompts {
        args.extend(["--prompt", p]);
    }
    let out = sae_ok(&args);
    let report = last_json(&out);
    let loaded = load_sae(&f.sae);
    let (dataset_max, density) = dataset_scales(f);
    let encoded: Vec<(Vec<u32>, Tensor)> = prompts.iter().map(|p| encode_directly(&loaded, p)).collect();
    let maxima: Vec<Vec<f32>> =
        encoded.iter().map(|(_, z)| Vec::<f32>::try_from(z.max_dim(0, false).0).unwrap()).collect();
    let d_sae = dataset_max.len();
    let in_all: Vec<usize> = (0..d_sae).filter(|&i| maxima.iter().all(|m| m[i] > 0.0)).collect();
    assert!(!in_all.is_empty(), "no feature fires on all three prompts");
    let weakest = |i: usize| maxima.iter().map(|m| m[i]).fold(f32::INFINITY, f32::min) as f64 / dataset_max[i] as f64;
    let dense = |i: usize| density[i] > 0.02;
    let mut want = in_all.clone();
    want.sort_by(|&a, &b| (dense(a), -weakest(a), a).partial_cmp(&(dense(b), -weakest(b), b)).unwrap());
    let shared = report["shared_features"].as_array().unwrap();
    let got: Vec<usize> = shared.iter().map(|s| s["feature"].as_u64().unwrap() as usize).collect();
    assert_eq!(got, want);
    assert_eq!(report["overlap"]["in_all"].as_u64(), Some(in_all.len() as u64));
    let active: Vec<u64> = maxima.iter().map(|m| m.iter().filter(|&&v| v > 0.0).count() as u64).collect();
    assert_eq!(report["overlap"]["active"], serde_json::json!(active));
    for s in shared {
        let feature = s["feature"].as_u64().unwrap() as usize;
        assert!(close(s["min_relative_activation"].as_f64().unwrap(), weakest(feature)), "feature {feature}");
        assert_eq!(s["dense"].as_bool(), Some(dense(feature)));
        for (p, (ids, z)) in encoded.iter().enumerate() {
            let column = Vec::<f32>::try_from(z.select(1, feature as i64)).unwrap();
            let fires = s["prompts"][p]["fires"].as_array().unwrap();
            let want: Vec<usize> = (0..column.len()).filter(|&r| column[r] > 0.0).map(|r| r + 1).collect();
            let got: Vec<usize> = fires.iter().map(|x| x["position"].as_u64().unwrap() as usize).collect();
            assert_eq!(got, want, "feature {feature} in prompt {p}");
            for x in fires {
                let position = x["position"].as_u64().unwrap() as usize;
                assert!(close(x["activation"].as_f64().unwrap(), column[position - 1] as f64));
                assert_eq!(x["token"], report["prompts"][p]["tokens"][position]);
            }
            assert_eq!(report["prompts"][p]["token_ids"], serde_json::json!(ids));
        }
    }
    assert!(stdout(&out).contains("fire in every prompt"), "{}", stdout(&out));
    // One prompt is not a comparison.
    let out = sae(&["features", "compare", "--sae", &f.sae, "--features", &f.features, "--prompt", "Bread"]);
    assert!(!out.status.success() && stderr(&out).contains("at least two prompts"), "{}", stderr(&out));
}

/// `sae features export --format neuronpedia`: the files pass the check against SAEDashboard's
/// and neuronpedia's own classes, and hold the features folder's examples, the model's logit
/// histogram and the decoder's neuron alignment.
#[test]
fn export_writes_neuronpedia_batches_that_the_packages_load() {
    let f = fixture();
    let out_dir = scratch("neuronpedia");
    let out = sae_ok(&[
        "features",
        "export",
        "--features",
        &f.features,
        "--format",
        "neuronpedia",
        out_dir.to_str().unwrap(),
    ]);
    assert!(stdout(&out).contains("source `15-sae-pipeline-res-1152`"), "{}", stdout(&out));
    let check = Command::new(testkit::venv::python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/neuronpedia_check.py"))
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(check.status.success(), "neuronpedia_check failed: {}", stderr(&check));
    let report = last_json(&check);
    let (dataset_max, density) = dataset_scales(f);
    let alive = dataset_max.iter().filter(|&&m| m > 0.0).count() as u64;
    assert_eq!(report["features"].as_u64(), Some(alive));
    assert_eq!(report["skipped"].as_u64(), Some(1152 - alive));
    assert_eq!(report["batches"].as_u64(), Some(alive.div_ceil(128)));
    assert_eq!(report["uploaded_features"].as_u64(), Some(alive));

    // One feature in detail, against the features folder and the weights.
    let batch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("batch-0.json")).unwrap()).unwrap();
    let feature = &batch["features"][0];
    let id = feature["feature_index"].as_u64().unwrap() as usize;
    assert_eq!(batch["layer"].as_u64(), Some(15));
    assert_eq!(feature["frac_nonzero"].as_f64(), Some(density[id]));
    let hist: f64 =
        feature["logits_hist_data_bar_heights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
    assert_eq!(hist as usize, model().tokenizer.vocab_size(), "the logit histogram counts every vocabulary token");
    let loaded = load_sae(&f.sae);
    let (values, indices) = loaded.sae.w_dec().get(id as i64).topk(3, 0, true, true);
    let want: Vec<i64> = Vec::<i64>::try_from(indices).unwrap();
    let got: Vec<i64> =
        feature["neuron_alignment_indices"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(got, want);
    let top = Vec::<f32>::try_from(values).unwrap()[0] as f64;
    assert!((feature["neuron_alignment_values"][0].as_f64().unwrap() - top).abs() <= 5e-4);
    let all = examples(f);
    let mine: Vec<&Ex> = all.iter().filter(|e| e.feature as usize == id).collect();
    let tops: Vec<&&Ex> = mine.iter().filter(|e| e.kind == "top").collect();
    let acts = feature["activations"].as_array().unwrap();
    assert_eq!(acts.len(), mine.len(), "every example of feature {id} is exported");
    for (a, e) in acts.iter().zip(&tops) {
        assert_eq!(a["bin_min"].as_f64(), Some(-1.0));
        assert_eq!(a["qualifying_token_index"].as_u64(), Some(e.center as u64));
        let values: Vec<f64> = a["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(values.len(), e.token_ids.len());
        assert!((values[e.center as usize] - e.activation as f64).abs() <= 5e-4);
    }
    // A wrong SAE is refused.
    let out = sae(&[
        "features",
        "export",
        "--features",
        &f.features,
        "--format",
        "neuronpedia",
        "--sae",
        &f.data,
        scratch("np-bad").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
}

/// Features of a multilingual capture: each feature's language shares equal the shares of its
/// top examples' languages, traced here through the capture library's own window packing.
#[test]
fn features_of_a_multilingual_capture_show_the_languages_of_their_top_examples() {
    let f = fixture();
    let data = scratch("multilingual-data").display().to_string();
    let out = sae_with(
        &["capture", "--out", &data, "--fortune-languages", "en,de,es,zh"],
        "--max-tokens 3000 --context-len 64 --batch-size 4 --row-group-rows 512",
    );
    assert!(out.status.success(), "capture failed: {}", stderr(&out));
    let features = scratch("multilingual-features").display().to_string();
    let build =
        ["features", "build", "--sae", &f.sae, "--data", &data, "--out", &features, "--top-k", "5", "--context", "2"];
    // The wrong languages name another corpus than the dataset records: refused before the pass.
    let out = sae(&[&build[..], &["--fortune-languages", "en,de"][..]].concat());
    assert!(!out.status.success() && stderr(&out).contains("another corpus"), "{}", stderr(&out));
    let out = sae_ok(&[&build[..], &["--fortune-languages", "en,de,es,zh"][..]].concat());
    assert!(stdout(&out).contains("features of"), "{}", stdout(&out));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&features).join("features.json")).unwrap()).unwrap();
    assert_eq!(summary["languages"], serde_json::json!(["en", "de", "es", "zh"]));

    let languages = ["en", "de", "es", "zh"].map(String::from);
    let spec = capture::corpus::CorpusSpec::multilingual_fortunes(&languages).unwrap();
    let corpus = capture::corpus::Corpus::open(spec.clone()).unwrap();
    let mix = spec.mix.as_ref().unwrap();
    let group_of_file: Vec<usize> = corpus
        .files()
        .iter()
        .map(|file| mix.groups.iter().position(|g| g.inputs.contains(&file.input)).unwrap())
        .collect();
    let opts = capture::windows::WindowOptions { end_window: Some(100), ..capture::windows::WindowOptions::new(64) };
    let windows: Vec<_> =
        capture::windows::WindowStream::start(corpus, std::sync::Arc::new(model().tokenizer.clone()), opts)
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let multilingual = Fixture { data: data.clone(), sae: f.sae.clone(), features: features.clone() };
    let mut counts: HashMap<u32, [u32; 4]> = HashMap::new();
    for e in examples(&multilingual).iter().filter(|e| e.kind == "top") {
        let window = &windows[e.sequence_id as usize];
        assert_eq!(window.tokens[e.position as usize], e.token_ids[e.center as usize]);
        let doc = window.document_at(e.position as usize).unwrap();
        counts.entry(e.feature).or_default()[group_of_file[doc.file as usize]] += 1;
    }
    let mut languages_seen = [false; 4];
    for b in read_parquet(&Path::new(&features).join("features.parquet")) {
        let shares = col::<ListArray>(&b, "language_shares");
        for i in 0..b.num_rows() {
            let feature = col::<UInt32Array>(&b, "feature").value(i);
            let got = shares.value(i).as_any().downcast_ref::<Float32Array>().unwrap().values().to_vec();
            match counts.get(&feature) {
                None => assert!(got.is_empty(), "feature {feature} has no top example but shares {got:?}"),
                Some(c) => {
                    let total: u32 = c.iter().sum();
                    let want: Vec<f32> = c.iter().map(|&n| n as f32 / total as f32).collect();
                    assert_eq!(got, want, "feature {feature}");
                    for (seen, &n) in languages_seen.iter_mut().zip(c) {
                        *seen |= n > 0;
                    }
                }
            }
        }
    }
    // Every language reaches the captured windows; the top examples (of an SAE trained on English
    // fortunes) need not hold all four, but they hold more than one.
    let mut languages_in_data = [false; 4];
    for window in &windows {
        for position in 0..window.tokens.len() {
            if let Some(doc) = window.document_at(position) {
                languages_in_data[group_of_file[doc.file as usize]] = true;
            }
        }
    }
    assert_eq!(languages_in_data, [true; 4], "some language is missing from the captured windows");
    assert!(
        languages_seen.iter().filter(|&&s| s).count() >= 2,
        "top examples in one language only: {languages_seen:?}"
    );
    // The browser shows them.
    let site = scratch("multilingual-site");
    sae_ok(&["features", "browse", "--features", &features, "--out", site.to_str().unwrap()]);
    let index = std::fs::read_to_string(site.join("index.html")).unwrap();
    assert!(
        index.contains("languages of top examples") && index.contains("class=\"langs\">"),
        "no languages on the index"
    );
}

#[test]
fn clamping_a_feature_to_its_own_activation_leaves_the_logits_and_a_large_clamp_changes_them() {
    let f = fixture();
    let sae = load_sae(&f.sae);
    let model = model();
    let (_, tokens, hook) = prompt_on_model(&model, PROMPT);
    let clean = model.network.forward(&tokens, None, &mut Hooks::new(), true).unwrap().logits.unwrap();
    let feature = 5i64;
    let run = |edit: &dyn Fn(&mut Tensor)| -> Tensor {
        let mut hooks = Hooks::new().intervene(hook, |x: &Tensor| {
            let (b, t, d) = x.size3().unwrap();
            Some(trainer::steer::splice(&sae.sae, &x.reshape([b * t, d]), |z| edit(z)).unwrap().reshape([b, t, d]))
        });
        model.network.forward(&tokens, None, &mut hooks, true).unwrap().logits.unwrap()
    };
    // Clamp to its own current activation at every position.
    let same = run(&|z: &mut Tensor| {
        let current = z.select(1, feature).copy();
        let mut column = z.select(1, feature);
        column.copy_(&current);
    });
    let diff = (&same - &clean).abs().max().double_value(&[]);
    assert!(diff < 1e-3, "logits moved by {diff}");
    let big = run(&|z: &mut Tensor| trainer::steer::FeatureEdit::Clamp { feature, value: 200.0 }.apply(z));
    let diff = (&big - &clean).abs().max().double_value(&[]);
    assert!(diff > 1.0, "a large clamp moved the logits by only {diff}");
}

#[test]
fn steer_prints_both_continuations_and_refuses_nx_without_features() {
    let f = fixture();
    let out = sae(&[
        "steer",
        "--sae",
        &f.sae,
        "--feature",
        "5",
        "--clamp",
        "5x",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "4",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--features") && stderr(&out).contains("sae features build"), "{}", stderr(&out));

    // The strongest feature on the prompt, clamped far above its maximum.
    let search = last_json(&sae_ok(&["features", "search", "--sae", &f.sae, "--prompt", "Once upon a time", "--json"]));
    let feature = search["prompt_features"][0]["feature"].as_i64().unwrap().to_string();
    let out = sae_ok(&[
        "steer",
        "--sae",
        &f.sae,
        "--feature",
        &feature,
        "--clamp",
        "10x",
        "--features",
        &f.features,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    let text = stdout(&out);
    assert!(text.contains("unsteered: ") && text.contains("steered (feature "), "{text}");
    let report = last_json(&out);
    assert_ne!(report["steered"], report["unsteered"], "a 10x clamp left the greedy continuation unchanged: {text}");
    // Adding zero is no change at all.
    let out = sae_ok(&[
        "steer",
        "--sae",
        &f.sae,
        "--feature",
        &feature,
        "--add",
        "0",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    let report = last_json(&out);
    assert_eq!(report["steered"], report["unsteered"]);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let f = fixture();
    // A feature id out of range.
    for args in [
        vec!["steer", "--sae", &f.sae, "--feature", "1152", "--clamp", "3", "--prompt", "Hi there"],
        vec!["features", "neighbors", "--sae", &f.sae, "--feature", "-1"],
    ] {
        let out = sae(&args);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("out of range"), "{}", stderr(&out));
    }
    // An SAE whose hook the model does not have.
    let moved = scratch("sae-bad-hook");
    std::fs::create_dir_all(&moved).unwrap();
    let cfg =
        std::fs::read_to_string(Path::new(&f.sae).join("cfg.json")).unwrap().replace(HOOK, "blocks.99.hook_resid_post");
    std::fs::write(moved.join("cfg.json"), cfg).unwrap();
    std::fs::copy(Path::new(&f.sae).join("sae_weights.safetensors"), moved.join("sae_weights.safetensors")).unwrap();
    let out = sae(&["features", "search", "--sae", moved.to_str().unwrap(), "--prompt", "Hi there"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("blocks.99.hook_resid_post") && stderr(&out).contains("does not exist in model"),
        "{}",
        stderr(&out)
    );
    // A features folder built from another SAE.
    let other = scratch("sae-other").display().to_string();
    let out = sae_with(
        &["train", "--data", &f.data, "--out", &other],
        "--latents 1152 --k 16 --batch-size 256 --max-tokens 1024 --seed 9 --no-eval --quiet",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sae(&[
        "steer",
        "--sae",
        &other,
        "--feature",
        "3",
        "--clamp",
        "5x",
        "--features",
        &f.features,
        "--prompt",
        "Hi there",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("built from another SAE"), "{}", stderr(&out));
    // A features folder that is not one.
    let out = sae(&["features", "browse", "--features", &f.data, "--out", scratch("no-site").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("holds no features"), "{}", stderr(&out));
}

/// The `<body ...>` opening tag of a dumped DOM (where the payloads would set their attribute).
fn body_tag(dom: &str) -> &str {
    let start = dom.find("<body").expect("a body element");
    &dom[start..start + dom[start..].find('>').unwrap()]
}

/// `sae run` on a corpus holding script and onerror payloads: the stages run, a second run reuses
/// them, and the browser's pages render real examples in Chromium without running the payloads.
#[test]
fn sae_run_end_to_end_and_the_browser_keeps_corpus_payloads_inert() {
    let dir = scratch("run");
    std::fs::create_dir_all(&dir).unwrap();
    let mut corpus = String::new();
    for i in 0..120 {
        corpus.push_str(&format!(
            "Note {i}: the page said <script>document.body.setAttribute('data-pwned','{i}')</script> and then \
             <img src=x onerror=\"document.body.setAttribute('data-pwned','img')\"> before the sailors left.\n%\n"
        ));
    }
    let corpus_path = dir.join("payloads.txt");
    std::fs::write(&corpus_path, corpus).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"{}\"\nthreads = 2\n[capture]\ncorpus = \"{}\"\ncorpus_format = \"fortune\"\nmax_tokens = 4000\ncontext_len = 64\n\
             [train]\nlatents = 576\nk = 8\nbatch_size = 256\nmax_tokens = 4096\nlr = 1e-3\nquiet = true\n\
             [eval]\neval_tokens = 512\n[features]\ntop_k = 3\ncontext = 6\n",
            dir.join("out").display(),
            corpus_path.display()
        ),
    )
    .unwrap();
    let out = sae_ok(&["run", "--config", config.to_str().unwrap()]);
    let text = stdout(&out);
    for stage in ["capture", "train", "eval", "features", "browse"] {
        assert!(text.lines().any(|l| l.starts_with(stage)), "no summary row for {stage}:\n{text}");
    }
    let index = dir.join("out/browser/index.html");
    assert!(text.contains(&format!("feature browser: {}", index.display())), "{text}");

    // A second run reuses every stage.
    let again = stdout(&sae_ok(&["run", "--config", config.to_str().unwrap()]));
    assert!(again.contains("already evaluated") && again.contains("already built"), "{again}");

    let dom = chromium_dom(&format!("file://{}", index.display()));
    assert!(dom.contains("id=\"search\"") && dom.contains("feature-row"), "index lacks its search box or rows");
    assert!(!body_tag(&dom).contains("data-pwned"), "a payload ran on the index");
    // The page of the feature with the most top examples holding a payload token.
    let examples = read_parquet(&dir.join("out/features/examples.parquet"));
    let b = &examples[0];
    let tokens = col::<ListArray>(b, "tokens");
    let row = (0..b.num_rows())
        .find(|&i| {
            let t = tokens.value(i);
            let t = t.as_any().downcast_ref::<StringArray>().unwrap();
            t.iter().any(|s| s.is_some_and(|s| s.contains('<')))
        })
        .expect("some example window holds a '<' token");
    let feature = col::<UInt32Array>(b, "feature").value(row);
    let pages = dir.join("out/browser/features");
    let page = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u32>().ok()) == Some(feature))
        .expect("a page for the feature");
    let dom = chromium_dom(&format!("file://{}", page.display()));
    assert!(!body_tag(&dom).contains("data-pwned"), "a payload ran on {}", page.display());
    assert!(!dom.contains("<img src=\"x\""), "a payload became an element on {}", page.display());
    for id in ["id=\"histogram\"", "id=\"top-examples\"", "id=\"logits\"", "id=\"neighbors\"", "class=\"tok"] {
        assert!(dom.contains(id), "{} lacks {id}", page.display());
    }
    assert!(dom.contains("&lt;"), "escaped markup shows as text");
}

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

/// `sae run` killed (SIGKILL) while it trains: the next run reuses the dataset, resumes training
/// from the newest checkpoint, and finishes the remaining stages.
#[test]
fn sae_run_resumes_after_being_killed_while_training() {
    let dir = scratch("run-killed");
    std::fs::create_dir_all(&dir).unwrap();
    let out_dir = dir.join("out");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"{}\"\nthreads = 1\n[capture]\nmax_tokens = 3000\ncontext_len = 64\n\
             [train]\nlatents = 576\nk = 8\nbatch_size = 64\nmax_tokens = 40000\nlr = 1e-3\ncheckpoint_every = 5\nquiet = true\n\
             [eval]\neval_tokens = 256\n[features]\ntop_k = 2\ncontext = 2\n",
            out_dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(SAE_BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let checkpoints = out_dir.join("sae/checkpoints");
    loop {
        let written = std::fs::read_dir(&checkpoints)
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".safetensors")));
        if written.unwrap_or(false) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "sae run ended before its first checkpoint");
        assert!(std::time::Instant::now() < deadline, "no checkpoint within 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out_dir.join("sae/result.json").exists(), "training had finished before the kill");

    let text = stdout(&sae_ok(&["run", "--config", config.to_str().unwrap()]));
    assert!(text.contains("resumed from step"), "training did not resume:\n{text}");
    assert!(text.contains("feature browser:") && out_dir.join("browser/index.html").exists(), "{text}");
}
