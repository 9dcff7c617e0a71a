//! Damaged and hostile GGUF files: a mutated file gives a clear error or a correct result, never
//! a panic, an abort or an allocation beyond [`ALLOCATION_LIMIT`].
//!
//! The property test mutates a small valid GGUF (metadata of every kind, nested arrays, a
//! tokenizer vocabulary and tensors of each supported type) and then does what loading a model
//! does with it: parse, read the configuration and tokenizer keys, dequantize every tensor.

use capture::gguf::{GgmlType, GgufBuilder, GgufFile, Value};
use proptest::prelude::*;
use testkit::CountingAllocator;

/// No single allocation made while parsing a damaged file may exceed this. The valid file is a
/// few KB; dequantizing can legitimately take 8x the file (Q4 to f32), but nothing near this.
const ALLOCATION_LIMIT: usize = 16 << 20;
/// Records the largest allocation, and refuses any over 1 GiB (see `testkit::alloc`).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small GGUF with metadata of every value type and tensors of every supported type.
fn valid_gguf() -> Vec<u8> {
    let tokens: Vec<Value> = ["a", "b", "ab", "<s>", "</s>"].iter().map(|t| Value::String(t.to_string())).collect();
    let q8: Vec<u8> = [0x00u8, 0x3c].into_iter().chain(0..32).collect(); // d = 1.0
    let q4_0: Vec<u8> = [0x00u8, 0x3c].into_iter().chain(0..16).collect();
    let q4_1: Vec<u8> = [0x00u8, 0x3c, 0x00, 0x00].into_iter().chain(0..16).collect();
    GgufBuilder::default()
        .metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.alignment", Value::U32(32))
        .metadata("llama.block_count", Value::U32(1))
        .metadata("llama.embedding_length", Value::U64(4))
        .metadata("llama.feed_forward_length", Value::U64(8))
        .metadata("llama.attention.head_count", Value::U16(2))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .metadata("llama.rope.freq_base", Value::F64(10_000.0))
        .metadata("flags", Value::Array(vec![Value::Bool(true), Value::Bool(false)]))
        .metadata("nested", Value::Array(vec![Value::Array(vec![Value::I8(-1), Value::I8(2)])]))
        .metadata("wide", Value::Array(vec![Value::I64(-5), Value::I64(1 << 40)]))
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata("tokenizer.ggml.tokens", Value::Array(tokens))
        .metadata("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())]))
        .metadata("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); 5]))
        .tensor("f32", &[2, 3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        .tensor("f16", &[2], GgmlType::F16, vec![0x00, 0x3c, 0x00, 0xc0])
        .tensor("bf16", &[2], GgmlType::BF16, vec![0x80, 0x3f, 0x00, 0x40])
        .tensor("q8_0", &[1, 32], GgmlType::Q8_0, q8)
        .tensor("q4_0", &[32], GgmlType::Q4_0, q4_0)
        .tensor("q4_1", &[32], GgmlType::Q4_1, q4_1)
        .build()
}

/// What loading a model does with a parsed file: every key a loader reads, every tensor.
fn use_every_part(file: &GgufFile) {
    let _ = capture::config::LlamaConfig::from_gguf(file);
    if let Ok(tokenizer) = capture::tokenizer::TextTokenizer::from_gguf(file) {
        let _ = tokenizer.encode("ab a b");
    }
    for key in ["llama.block_count", "llama.embedding_length", "llama.attention.head_count"] {
        let _ = file.require_u64(key);
    }
    let _ = file.require_f64("llama.attention.layer_norm_rms_epsilon");
    if let Some(tokens) = file.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
        let _: usize = tokens.iter().filter_map(Value::as_str).map(str::len).sum();
    }
    for info in &file.tensors {
        match file.dequantize(&info.name) {
            Ok((shape, values)) => assert_eq!(shape.iter().product::<usize>(), values.len(), "tensor {:?}", info.name),
            Err(err) => {
                let text = err.to_string();
                assert!(
                    text.contains(&format!("{:?}", info.name)) && text.contains("damaged.gguf"),
                    "the error names no tensor: {err}"
                );
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Overwrite one byte.
    Byte { at: usize, value: u8 },
    /// Write an extreme u64 (a count, a length, a dimension or an offset, wherever it lands).
    Word { at: usize, value: u64 },
    /// Cut the file short.
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let extreme = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u32::MAX as u64),
        Just(1 << 32),
        Just(1 << 40),
        Just(1 << 62),
        Just(i64::MAX as u64),
        Just(u64::MAX),
        any::<u64>(),
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        (any::<usize>(), extreme).prop_map(|(at, value)| Mutation::Word { at, value }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(mut image: Vec<u8>, mutation: &Mutation) -> Vec<u8> {
    // An earlier truncation may have left too little to mutate.
    if image.len() <= 8 {
        return image;
    }
    match *mutation {
        Mutation::Byte { at, value } => {
            let at = at % image.len();
            image[at] = value;
        }
        Mutation::Word { at, value } => {
            let at = at % (image.len() - 8);
            image[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        Mutation::Truncate { at } => image.truncate(at % image.len()),
    }
    image
}

#[test]
fn the_valid_file_reads_back() {
    let file = GgufFile::from_bytes("valid.gguf", valid_gguf()).unwrap();
    assert_eq!(file.tensors.len(), 6);
    assert_eq!(file.dequantize("f32").unwrap(), (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    assert_eq!(file.dequantize("f16").unwrap().1, vec![1.0, -2.0]);
    assert_eq!(file.dequantize("q8_0").unwrap().1[31], 31.0);
    assert_eq!(capture::config::LlamaConfig::from_gguf(&file).unwrap().hidden_size, 4);
    let tokenizer = capture::tokenizer::TextTokenizer::from_gguf(&file).unwrap();
    assert_eq!(tokenizer.encode("ab").unwrap(), vec![2]);
    use_every_part(&file);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn damaged_gguf_is_an_error_or_a_usable_file(mutations in prop::collection::vec(mutation(), 1..4)) {
        let image = mutations.iter().fold(valid_gguf(), apply);
        CountingAllocator::reset();
        match GgufFile::from_bytes("damaged.gguf", image) {
            Ok(file) => use_every_part(&file),
            Err(err) => prop_assert!(err.to_string().contains("damaged.gguf"), "the error names no file: {}", err),
        }
        let largest = CountingAllocator::largest();
        prop_assert!(largest <= ALLOCATION_LIMIT, "an allocation of {} bytes for a damaged file", largest);
    }
}
