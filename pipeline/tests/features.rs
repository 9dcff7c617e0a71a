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

#[test]
fn search_reports_what_a_direct_encode_gives() {
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

    // Direct: tokenize, run to the hook, encode every position but the first.
    let sae = load_sae(&f.sae);
    let model = model();
    let ids = model.tokenizer.encode(PROMPT).unwrap();
    let hook = HookPoint::parse(HOOK, 30).unwrap();
    let tokens = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let mut hooks = Hooks::new().capture([hook]);
    let acts = model.network.forward(&tokens, None, &mut hooks, false).unwrap().hooks[&hook].squeeze_dim(0);
    let z = sae.sae.encode(&acts.narrow(0, 1, ids.len() as i64 - 1)).unwrap();

    let per_token = report["tokens"].as_array().unwrap();
    assert_eq!(per_token.len(), ids.len() - 1);
    for t in per_token {
        let position = t["position"].as_i64().unwrap();
        let (want_values, want_ids) = z.get(position - 1).topk(4, 0, true, true);
        let want_ids = Vec::<i64>::try_from(want_ids).unwrap();
        let want_values = Vec::<f32>::try_from(want_values).unwrap();
        let got = t["features"].as_array().unwrap();
        assert_eq!(got.len(), want_values.iter().filter(|&&v| v > 0.0).count());
        for (j, hit) in got.iter().enumerate() {
            assert_eq!(hit["feature"].as_i64(), Some(want_ids[j]), "position {position}");
            assert!(close(hit["activation"].as_f64().unwrap(), want_values[j] as f64));
        }
    }
    for hit in report["prompt_features"].as_array().unwrap() {
        let feature = hit["feature"].as_i64().unwrap();
        let column = z.select(1, feature);
        assert!(close(hit["max_activation"].as_f64().unwrap(), column.max().double_value(&[])));
        assert_eq!(hit["tokens_fired"].as_i64(), Some(column.gt(0.0).sum(Kind::Int64).int64_value(&[])));
    }
}

#[test]
fn clamping_a_feature_to_its_own_activation_leaves_the_logits_and_a_large_clamp_changes_them() {
    let f = fixture();
    let sae = load_sae(&f.sae);
    let model = model();
    let ids = model.tokenizer.encode(PROMPT).unwrap();
    let tokens = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let hook = HookPoint::parse(HOOK, 30).unwrap();
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
