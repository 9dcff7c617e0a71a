//! The loop's own refusals, on a small dataset written to a temporary folder.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use store::{DatasetHeader, DatasetWriter, HookSpec, ModelIdentity, ObjectDir, RowBatch, StoreOptions, WriterOptions};
use tch::Device;

use super::*;
use crate::checkpoint::{self, RngState};

const HOOK: &str = "blocks.0.hook_resid_post";
const D_MODEL: usize = 16;

/// A fresh folder under the system's temporary directory.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("trainer-train-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A finished dataset of 256 synthetic rows of width [`D_MODEL`].
fn dataset(dir: &std::path::Path) -> String {
    let url = dir.join("data").display().to_string();
    let header = DatasetHeader {
        model: ModelIdentity { name: "synthetic".into(), file_sha256: String::new() },
        tokenizer: Default::default(),
        hooks: vec![HookSpec { name: HOOK.into(), d_model: D_MODEL }],
        context_len: 8,
        corpus: Default::default(),
        created: Default::default(),
    };
    let mut writer = DatasetWriter::create(&url, header, WriterOptions::default()).unwrap();
    let n = 256;
    let values: Vec<f32> = (0..n * D_MODEL).map(|i| ((i * 7919) % 113) as f32 / 10.0 - 5.0).collect();
    writer
        .append(RowBatch {
            sequence_id: (0..n as u64).map(|i| i / 7).collect(),
            position: (0..n as u32).map(|i| 1 + i % 7).collect(),
            token_id: (0..n as u32).collect(),
            activations: vec![(HOOK.into(), values)],
        })
        .unwrap();
    writer.finish().unwrap();
    url
}

fn request(data_url: String, out_url: String, stop: bool) -> TrainRequest {
    TrainRequest {
        data_url,
        out_url,
        hook: None,
        settings: RunSettings {
            hook: String::new(),
            max_tokens: 256,
            batch_size: 32,
            world_size: 1,
            lr: 1e-3,
            warmup_steps: 0,
            lr_decay_fraction: 0.2,
            sparsity_warmup_steps: 0,
            grad_clip: 1.0,
            adam_betas: (0.9, 0.999),
            adam_eps: 1e-8,
            seed: 7,
            dead_window: 1000,
            follow: false,
            shuffle: true,
            shuffle_window: 8,
            bf16_autocast: false,
            max_norm_multiple: None,
            decoder_init: DecoderInit::Data,
        },
        members: vec![Member { d_sae: 32, arch: Architecture::TopK { k: 4 }, ..Member::default() }],
        device: Device::Cpu,
        store: StoreOptions::default(),
        group: None,
        checkpoint_every: 0,
        log_every: 1,
        stop: Arc::new(AtomicBool::new(stop)),
        progress: false,
    }
}

/// Writes `saved` back as the checkpoint of its step (after a test has edited its state).
fn save_again(out_dir: &ObjectDir, saved: &checkpoint::Checkpoint) {
    let named = |m: &std::collections::BTreeMap<String, tch::Tensor>| {
        m.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>()
    };
    checkpoint::save(
        out_dir,
        &saved.state,
        &named(&saved.sae),
        &named(&saved.adam),
        &saved.dead_counters,
        saved.pending_metrics.as_ref(),
    )
    .unwrap();
}

#[test]
fn a_checkpoint_whose_seeds_are_not_the_runs_is_refused() {
    let dir = scratch("seed");
    let data = dataset(&dir);
    let out = dir.join("out").display().to_string();
    // Stopped before its first step: a checkpoint of step 0.
    let interrupted = train(&request(data.clone(), out.clone(), true));
    assert!(matches!(interrupted, Err(TrainError::Interrupted { step: 0 })), "{interrupted:?}");

    // The same checkpoint, its random state claiming another seed (the configuration unchanged).
    let out_dir = ObjectDir::open(&out, &StoreOptions::default()).unwrap();
    let mut saved = checkpoint::load(&out_dir, 0).unwrap();
    saved.state.rng = RngState { torch_seed: 8, reader_seed: 7 };
    save_again(&out_dir, &saved);

    let err = train(&request(data, out, false)).unwrap_err();
    assert!(matches!(err, TrainError::SeedMismatch { seed: 7, .. }), "{err}");
    assert!(err.to_string().contains("this run's seed is 7"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_begun_before_the_decoder_init_setting_resumes_with_random_and_only_with_it() {
    let dir = scratch("before-decoder-init");
    let data = dataset(&dir);
    let out = dir.join("out").display().to_string();
    let with_init = |decoder_init, stop| {
        let mut req = request(data.clone(), out.clone(), stop);
        req.settings.decoder_init = decoder_init;
        req
    };
    let interrupted = train(&with_init(DecoderInit::Random, true));
    assert!(matches!(interrupted, Err(TrainError::Interrupted { step: 0 })), "{interrupted:?}");

    // The checkpoint as an older release wrote it: no decoder_init in its configuration.
    let out_dir = ObjectDir::open(&out, &StoreOptions::default()).unwrap();
    let mut saved = checkpoint::load(&out_dir, 0).unwrap();
    let removed = saved.state.config["settings"].as_object_mut().unwrap().remove("decoder_init");
    assert_eq!(removed, Some(serde_json::json!("random")));
    save_again(&out_dir, &saved);

    let err = train(&with_init(DecoderInit::Data, false)).unwrap_err();
    assert!(matches!(err, TrainError::OtherConfiguration { .. }), "{err}");
    assert!(err.to_string().contains("decoder_init"), "{err}");
    // Accepted: the older configuration reads as decoder_init = random.
    let summaries = train(&with_init(DecoderInit::Random, false)).unwrap();
    assert_eq!(summaries[0].tokens, 256);
    let _ = std::fs::remove_dir_all(&dir);
}
