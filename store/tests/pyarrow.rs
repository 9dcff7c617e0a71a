//! The pyarrow snippet in docs/format.md, run with the project's venv python (SAE_PYTHON,
//! default ~/.cache/sae-pipeline/venv/bin/python3), must rebuild exactly what our reader reads.

mod common;

use std::process::Command;

use common::*;
use store::reader::{OutputDtype, Reader, ReaderOptions};
use store::{DatasetWriter, Dtype, WriterOptions};

fn snippet() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/format.md")).unwrap();
    let start = doc.find("<!-- pyarrow-snippet:start -->").expect("start marker");
    let end = doc.find("<!-- pyarrow-snippet:end -->").expect("end marker");
    let block = &doc[start..end];
    let code = block.split("```python").nth(1).unwrap().split("```").next().unwrap();
    assert!(code.contains("def read_hook"));
    code.to_string()
}

#[test]
fn the_documented_pyarrow_snippet_matches_our_reader() {
    let py = python();
    assert!(py.exists(), "{} not found: run scripts/setup.sh --test (or set SAE_PYTHON)", py.display());
    let code = snippet();
    let hooks = [("blocks.2.hook_resid_post", 20), ("blocks.7.hook_mlp_out", 13)];
    for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
        let dir = TempDir::new("pyarrow");
        let ds = dir.path().join("ds");
        let url = ds.to_str().unwrap().to_string(); // a plain path
        let opts = WriterOptions { dtype, row_group_rows: 70, shard_bytes: Some(9_000), ..Default::default() };
        let mut w = DatasetWriter::create(&url, header(&hooks, 30), opts).unwrap();
        for s in (0..20).step_by(4) {
            w.append(synth(s, 4, 30, &hooks)).unwrap();
        }
        let m = w.finish().unwrap();
        assert!(m.shards.len() > 1, "several shards");
        for (hook, d) in hooks {
            let out = dir.path().join(format!("{hook}.f32"));
            let script = format!(
                "{code}\nimport sys\na = read_hook(sys.argv[1], sys.argv[2])\nassert a.dtype == np.float32 and a.shape == ({}, {d}), a.shape\na.tofile(sys.argv[3])\n",
                m.tokens
            );
            let status = Command::new(&py).arg("-c").arg(&script).arg(&ds).arg(hook).arg(&out).status().unwrap();
            assert!(status.success(), "pyarrow snippet failed for {dtype:?} {hook}");
            let theirs = std::fs::read(&out).unwrap();

            let mut o = ReaderOptions::new(hook, 64);
            o.shuffle = false;
            o.drop_last = false;
            o.epochs = Some(1);
            o.output = OutputDtype::F32;
            let ours: Vec<u8> = Reader::open(&url, o).unwrap().flat_map(|b| b.unwrap().bytes).collect();
            assert_eq!(ours.len(), theirs.len(), "{dtype:?} {hook}");
            assert!(ours == theirs, "{dtype:?} {hook}: pyarrow and our reader disagree");
            // And both are the values written (rounded to the dtype).
            let hi = hooks.iter().position(|h| h.0 == hook).unwrap();
            assert_eq!(&f32s(&theirs)[d * 35..d * 36], &stored_values(dtype, hi, 1, 5, d)[..]);
        }
    }
}
