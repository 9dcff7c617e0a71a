//! `sae features search` and `compare` against a direct encode of each prompt.

use super::*;

/// Latents of `prompt` encoded directly: tokenize, run to the hook, encode every position but the first.
fn encode_directly(sae: &LoadedSae, prompt: &str) -> (Vec<u32>, Tensor) {
    let model = model();
    let (ids, tokens, hook) = prompt_on_model(&model, prompt);
    let mut hooks = Hooks::new().capture([hook]);
    let acts = model.network.forward(&tokens, None, &mut hooks, false).unwrap().hooks[&hook].squeeze_dim(0);
    let z = sae.sae.encode(&acts.narrow(0, 1, ids.len() as i64 - 1)).unwrap();
    (ids, z)
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
