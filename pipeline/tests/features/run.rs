//! `sae run`: every stage end to end, the browser in Chromium, and a resume after a kill.

use super::*;

/// The `<body ...>` opening tag of a dumped DOM (where the payloads would set their attribute).
fn body_tag(dom: &str) -> &str {
    let start = dom.find("<body").expect("a body element");
    &dom[start..start + dom[start..].find('>').unwrap()]
}

/// `sae run` on a corpus holding script and onerror payloads: the stages run, a second run reuses
/// them, and the browser's pages render real examples in Chromium without running the payloads.
#[test]
fn sae_run_end_to_end_and_the_browser_keeps_corpus_payloads_inert() {
    let dir = scratch("run");
    std::fs::create_dir_all(&dir).unwrap();
    let mut corpus = String::new();
    for i in 0..120 {
        corpus.push_str(&format!(
            "Note {i}: the page said <script>document.body.setAttribute('data-pwned','{i}')</script> and then \
             <img src=x onerror=\"document.body.setAttribute('data-pwned','img')\"> before the sailors left.\n%\n"
        ));
    }
    let corpus_path = dir.join("payloads.txt");
    std::fs::write(&corpus_path, corpus).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"{}\"\nthreads = 2\n[capture]\ncorpus = \"{}\"\ncorpus_format = \"fortune\"\nmax_tokens = 4000\ncontext_len = 64\n\
             [train]\nlatents = 576\nk = 8\nbatch_size = 256\nmax_tokens = 4096\nlr = 1e-3\nquiet = true\n\
             [eval]\neval_tokens = 512\n[features]\ntop_k = 3\ncontext = 6\n",
            dir.join("out").display(),
            corpus_path.display()
        ),
    )
    .unwrap();
    let out = sae_ok(&["run", "--config", config.to_str().unwrap()]);
    let text = stdout(&out);
    for stage in ["capture", "train", "eval", "features", "browse"] {
        assert!(text.lines().any(|l| l.starts_with(stage)), "no summary row for {stage}:\n{text}");
    }
    let index = dir.join("out/browser/index.html");
    assert!(text.contains(&format!("feature browser: {}", index.display())), "{text}");

    // A second run reuses every stage.
    let again = stdout(&sae_ok(&["run", "--config", config.to_str().unwrap()]));
    assert!(again.contains("already evaluated") && again.contains("already built"), "{again}");

    let dom = chromium_dom(&format!("file://{}", index.display()));
    assert!(dom.contains("id=\"search\"") && dom.contains("feature-row"), "index lacks its search box or rows");
    assert!(!body_tag(&dom).contains("data-pwned"), "a payload ran on the index");
    // The page of the feature with the most top examples holding a payload token.
    let examples = read_parquet(&dir.join("out/features/examples.parquet"));
    let b = &examples[0];
    let tokens = col::<ListArray>(b, "tokens");
    let row = (0..b.num_rows())
        .find(|&i| {
            let t = tokens.value(i);
            let t = t.as_any().downcast_ref::<StringArray>().unwrap();
            t.iter().any(|s| s.is_some_and(|s| s.contains('<')))
        })
        .expect("some example window holds a '<' token");
    let feature = col::<UInt32Array>(b, "feature").value(row);
    let pages = dir.join("out/browser/features");
    let page = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u32>().ok()) == Some(feature))
        .expect("a page for the feature");
    let dom = chromium_dom(&format!("file://{}", page.display()));
    assert!(!body_tag(&dom).contains("data-pwned"), "a payload ran on {}", page.display());
    assert!(!dom.contains("<img src=\"x\""), "a payload became an element on {}", page.display());
    for id in ["id=\"histogram\"", "id=\"top-examples\"", "id=\"logits\"", "id=\"neighbors\"", "class=\"tok"] {
        assert!(dom.contains(id), "{} lacks {id}", page.display());
    }
    assert!(dom.contains("&lt;"), "escaped markup shows as text");
}

/// `sae run` killed (SIGKILL) while it trains: the next run reuses the dataset, resumes training
/// from the newest checkpoint, and finishes the remaining stages.
#[test]
fn sae_run_resumes_after_being_killed_while_training() {
    let dir = scratch("run-killed");
    std::fs::create_dir_all(&dir).unwrap();
    let out_dir = dir.join("out");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"{}\"\nthreads = 1\n[capture]\nmax_tokens = 3000\ncontext_len = 64\n\
             [train]\nlatents = 576\nk = 8\nbatch_size = 64\nmax_tokens = 40000\nlr = 1e-3\ncheckpoint_every = 5\nquiet = true\n\
             [eval]\neval_tokens = 256\n[features]\ntop_k = 2\ncontext = 2\n",
            out_dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(SAE_BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let checkpoints = out_dir.join("sae/checkpoints");
    loop {
        let written = std::fs::read_dir(&checkpoints)
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".safetensors")));
        if written.unwrap_or(false) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "sae run ended before its first checkpoint");
        assert!(std::time::Instant::now() < deadline, "no checkpoint within 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out_dir.join("sae/result.json").exists(), "training had finished before the kill");

    let text = stdout(&sae_ok(&["run", "--config", config.to_str().unwrap()]));
    assert!(text.contains("resumed from step"), "training did not resume:\n{text}");
    assert!(text.contains("feature browser:") && out_dir.join("browser/index.html").exists(), "{text}");
}
