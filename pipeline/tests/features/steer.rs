//! Clamping a feature in the model, and `sae steer`.

use super::*;

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
