//! `sae features export --format neuronpedia`, checked with the packages that read it.

use super::*;

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
