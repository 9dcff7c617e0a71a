//! Hook points on the real model: consistency between hooks, early exit, interventions, KV cache.

mod common;

use capture::{HookPoint, Hooks};
use tch::{Kind, Tensor};

const TEXT: &str = "A fortune cookie said: you will write a sparse autoencoder today.";

#[test]
fn resid_post_of_each_block_is_resid_pre_of_the_next() {
    let model = common::model();
    let n = model.network.n_layers();
    let tokens = common::ids(&model.tokenizer.encode(TEXT).unwrap());
    let points = (0..n).flat_map(|i| [HookPoint::ResidPre(i), HookPoint::ResidPost(i)]);
    let mut hooks = Hooks::new().capture(points).capture([HookPoint::Embed]);
    let out = model.network.forward(&tokens, None, &mut hooks, false).unwrap();
    assert!(out.hooks[&HookPoint::Embed].equal(&out.hooks[&HookPoint::ResidPre(0)]));
    for i in 0..n - 1 {
        assert!(out.hooks[&HookPoint::ResidPost(i)].equal(&out.hooks[&HookPoint::ResidPre(i + 1)]), "block {i}");
    }
    // and the blocks do change the stream
    assert!(!out.hooks[&HookPoint::ResidPre(3)].equal(&out.hooks[&HookPoint::ResidPost(3)]));
}

#[test]
fn early_exit_returns_the_same_activations_as_the_full_forward() {
    let model = common::model();
    let tokens = common::ids(&model.tokenizer.encode(TEXT).unwrap());
    let points = [HookPoint::ResidPost(15), HookPoint::AttnOut(7), HookPoint::MlpOut(15)];
    let early = model.network.forward(&tokens, None, &mut Hooks::new().capture(points), false).unwrap();
    let full = model.network.forward(&tokens, None, &mut Hooks::new().capture(points), true).unwrap();
    assert!(early.logits.is_none() && full.logits.is_some());
    for p in points {
        assert!(early.hooks[&p].equal(&full.hooks[&p]), "{p} differs between early exit and full forward");
        assert_eq!(early.hooks[&p].size()[2], 576);
    }
    // ln_final and the residual around it: residual + final norm give the logits' input.
    let out = model.network.forward(&tokens, None, &mut Hooks::new().capture([HookPoint::LnFinal]), false).unwrap();
    let normed = &out.hooks[&HookPoint::LnFinal];
    let logits = normed.matmul(&model.network.unembedding().tr());
    assert!(logits.allclose(full.logits.as_ref().unwrap(), 1e-4, 1e-4, false));
}

#[test]
fn identity_intervention_changes_nothing_and_zeroing_changes_logits() {
    let model = common::model();
    let tokens = common::ids(&model.tokenizer.encode(TEXT).unwrap());
    let clean = model.network.forward(&tokens, None, &mut Hooks::new(), true).unwrap().logits.unwrap();

    let mut calls = 0;
    let mut identity = Hooks::new().intervene(HookPoint::ResidPost(10), |x| {
        calls += 1;
        Some(x.shallow_clone())
    });
    let same = model.network.forward(&tokens, None, &mut identity, true).unwrap().logits.unwrap();
    drop(identity);
    assert_eq!(calls, 1);
    assert!(same.equal(&clean), "an identity intervention changed the logits");

    let mut none = Hooks::new().intervene(HookPoint::MlpOut(4), |_| None);
    assert!(model.network.forward(&tokens, None, &mut none, true).unwrap().logits.unwrap().equal(&clean));

    let mut zero = Hooks::new().intervene(HookPoint::ResidPost(10), |x| Some(x.zeros_like()));
    let zeroed = model.network.forward(&tokens, None, &mut zero, true).unwrap().logits.unwrap();
    let change = (&zeroed - &clean).abs().max().double_value(&[]);
    assert!(change > 1.0, "zeroing the residual moved the logits by only {change}");
}

#[test]
fn kv_cache_gives_the_same_logits_as_a_full_forward() {
    let model = common::model();
    let ids = model.tokenizer.encode(TEXT).unwrap();
    let full = model.network.forward(&common::ids(&ids), None, &mut Hooks::new(), true).unwrap().logits.unwrap();
    let mut cache = model.network.new_cache();
    let split = 5;
    // a multi-token prefix, then a multi-token chunk (masked against the cache), then one token.
    let a = model
        .network
        .forward(&common::ids(&ids[..split]), Some(&mut cache), &mut Hooks::new(), true)
        .unwrap()
        .logits
        .unwrap();
    let b = model
        .network
        .forward(&common::ids(&ids[split..ids.len() - 1]), Some(&mut cache), &mut Hooks::new(), true)
        .unwrap()
        .logits
        .unwrap();
    let c = model
        .network
        .forward(&common::ids(&ids[ids.len() - 1..]), Some(&mut cache), &mut Hooks::new(), true)
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(cache.len() as usize, ids.len());
    let stitched = Tensor::cat(&[a, b, c], 1);
    let err = (&stitched - &full).abs().max().double_value(&[]);
    let scale = full.abs().max().double_value(&[]);
    assert!(err <= 1e-4 * scale, "cached logits differ by {err} (scale {scale})");
}

#[test]
fn compute_dtypes_other_than_f32_run() {
    let model = capture::Model::load(&common::model_path(), tch::Device::Cpu, Kind::BFloat16).unwrap();
    let ids = model.tokenizer.encode("The capital of France is").unwrap();
    let logits = model.network.forward(&common::ids(&ids), None, &mut Hooks::new(), true).unwrap().logits.unwrap();
    assert_eq!(logits.kind(), Kind::Float);
    let best = logits.get(0).get(-1).argmax(0, false).int64_value(&[]) as u32;
    assert_eq!(model.tokenizer.decode(&[best]).unwrap(), " Paris");
}
