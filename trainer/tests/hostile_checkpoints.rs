//! Damaged checkpoint files: a mutated checkpoint loads as exactly what was saved or fails with
//! an error naming it, never a panic, an abort or an allocation beyond [`ALLOCATION_LIMIT`].

use proptest::prelude::*;
use store::reader::Cursor;
use store::{ObjectDir, StoreOptions};
use tch::Tensor;
use testkit::CountingAllocator;
use trainer::checkpoint::{self, CheckpointState, Normalization, RngState};

/// The checkpoint is a few KB, so an allocation near this was sized from a forged field.
const ALLOCATION_LIMIT: usize = 64 << 20;

/// Records the largest allocation, and refuses any over 1 GiB (see `testkit::alloc`).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const STEP: u64 = 40;

fn state() -> CheckpointState {
    CheckpointState {
        format_version: checkpoint::FORMAT_VERSION,
        step: STEP,
        tokens: 10240,
        cursor: Cursor { epoch: 1, batch: 3 },
        adam_steps: STEP,
        config: serde_json::json!({ "dataset_id": "d", "settings": { "lr": 0.001 } }),
        rng: RngState { torch_seed: 7, reader_seed: 7 },
        metrics: vec![],
        pending_metric_steps: 2,
        normalization: Some(Normalization { scale: 0.37, variance: 0.9 }),
        follow_shards: vec!["shards/w0-00000000-ab.parquet".into()],
    }
}

fn named(values: &[f32]) -> Vec<(String, Tensor)> {
    vec![("W_dec".to_string(), Tensor::from_slice(values).view([4, values.len() as i64 / 4]))]
}

/// A saved checkpoint's bytes.
fn saved(dir: &ObjectDir) -> Vec<u8> {
    let w: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
    let dead = Tensor::from_slice(&[5i64, 0, 9, 1]);
    checkpoint::save(dir, &state(), &named(&w), &named(&w[..32]), &dead, Some(&Tensor::from_slice(&[1.5f32, 2.5])))
        .unwrap();
    dir.get(&format!("checkpoints/step-{STEP:09}.safetensors")).unwrap().unwrap().to_vec()
}

#[derive(Debug, Clone)]
enum Damage {
    FlipBit { at: usize, bit: u8 },
    Overwrite { at: usize, bytes: Vec<u8> },
    Truncate { to: usize },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::FlipBit { at, bit }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Damage::Overwrite { at, bytes }),
        any::<usize>().prop_map(|to| Damage::Truncate { to }),
    ]
}

fn apply(mut bytes: Vec<u8>, d: &Damage) -> Vec<u8> {
    let n = bytes.len();
    match d {
        Damage::FlipBit { at, bit } => bytes[at % n] ^= 1 << bit,
        Damage::Overwrite { at, bytes: new } => {
            let at = at % n;
            for (i, b) in new.iter().enumerate().take(n - at) {
                bytes[at + i] = *b;
            }
        }
        Damage::Truncate { to } => bytes.truncate(to % n),
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_checkpoint_is_an_error_or_exactly_what_was_saved(d in damage()) {
        let dir = ObjectDir::open("memory://hostile-checkpoints/run", &StoreOptions::default()).unwrap();
        let original = saved(&dir);
        let expected = checkpoint::load(&dir, STEP).unwrap();
        let key = format!("checkpoints/step-{STEP:09}.safetensors");
        let damaged = apply(original.clone(), &d);
        dir.put(&key, damaged.clone()).unwrap();
        CountingAllocator::reset();
        let loaded = checkpoint::load(&dir, STEP);
        let largest = CountingAllocator::largest();
        prop_assert!(largest < ALLOCATION_LIMIT, "an allocation of {largest} bytes");
        match loaded {
            Err(e) => {
                prop_assert!(e.is_damage(), "{e}");
                prop_assert!(e.to_string().contains(&key), "{e}");
            }
            Ok(c) => {
                prop_assert_eq!(&c.state, &expected.state);
                for (name, t) in &expected.sae {
                    prop_assert!(c.sae[name].equal(t), "{name}");
                }
                for (name, t) in &expected.adam {
                    prop_assert!(c.adam[name].equal(t), "{name}");
                }
                prop_assert!(c.dead_counters.equal(&expected.dead_counters));
            }
        }
    }
}

#[test]
fn a_flipped_bit_in_the_state_is_caught_by_the_checksum() {
    let dir = ObjectDir::open("memory://hostile-checkpoints/state", &StoreOptions::default()).unwrap();
    let mut bytes = saved(&dir);
    // The state's `tokens` 10240 becomes 10241: still valid JSON, a different state.
    let at = bytes.windows(5).position(|w| w == b"10240").expect("tokens in the header");
    bytes[at + 4] = b'1';
    dir.put(&format!("checkpoints/step-{STEP:09}.safetensors"), bytes).unwrap();
    let err = checkpoint::load(&dir, STEP).err().expect("the damaged state must be refused").to_string();
    assert!(err.contains("hash to") && err.contains("recorded when it was saved"), "{err}");
}
