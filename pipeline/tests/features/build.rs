//! `sae features build` and `neighbors` against a brute-force pass over the dataset, and the
//! language shares of a multilingual capture.

use super::*;

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
