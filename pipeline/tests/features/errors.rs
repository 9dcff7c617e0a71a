//! Bad inputs to the features commands and `sae steer`: clear errors that name the object.

use super::*;

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
    // Trained without --lr: the default rate of 1152 latents, 1e-3 × √(4608 / 1152).
    let result = std::fs::read_to_string(Path::new(&other).join("result.json")).unwrap();
    let result: serde_json::Value = serde_json::from_str(&result).unwrap();
    assert_eq!(result["config"]["settings"]["lr"].as_f64(), Some(2e-3), "{result}");
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
