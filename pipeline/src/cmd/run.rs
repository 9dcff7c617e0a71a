//! `sae run`: the whole flow on one configuration — capture, train, eval, features build,
//! browse — each stage reusing what a previous run finished and resuming what it left half done.
//!
//! The configuration is TOML. Top-level keys name the run's folder and the model flags every
//! stage shares; each table holds the flags of one stage, by their long names:
//!
//! ```toml
//! dir = "runs/demo"          # data/, sae/, features/ and browser/ go here
//! threads = 2                # also model, device, dtype
//! [capture]                  # flags of `sae capture`
//! max_tokens = 100000
//! hook = "blocks.15.hook_resid_post"
//! [train]                    # flags of `sae train`
//! arch = "topk"
//! k = 32
//! [eval]                     # eval_tokens, density_tokens, eval_batch
//! [features]                 # flags of `sae features build`
//! top_k = 20
//! ```
//!
//! Without a file the defaults are the demo's: SmolLM2-135M, 400k tokens of Debian's fortunes in
//! English, German, Spanish and Chinese, mixed in a fixed cycle (`fortune_languages`), at
//! `blocks.15.hook_resid_post`, a TopK SAE at 8× with k = 32 over 1.2M tokens (3 passes).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use store::{ObjectDir, StoreOptions};

use crate::cmd::eval::{evaluate, EvalArgs, EvalReport, EVAL_FILE};
use crate::cmd::features::{browse, run_build, BrowseArgs, BuildArgs};
use crate::cmd::train::toml_flags;
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML file with the run's settings (see `sae run --help`); defaults are the demo's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The run's folder (overrides `dir` in the file). Default: runs/sae-run.
    #[arg(long)]
    dir: Option<String>,
}

/// The demo's settings, used for every stage table the file leaves out.
const DEFAULTS: &str = r#"
[capture]
hook = "blocks.15.hook_resid_post"
max_tokens = 400000
fortune_languages = "en,de,es,zh"
[train]
arch = "topk"
k = 32
batch_size = 1024
lr = 5e-4
max_tokens = 1200000
"#;

/// The default `[capture] fortune_languages`.
fn defaults_fortune_languages() -> Option<toml::Value> {
    let defaults: toml::Table = DEFAULTS.parse().expect("valid defaults");
    defaults.get("capture").and_then(|c| c.get("fortune_languages")).cloned()
}

/// Top-level keys passed to every stage that runs the model.
const SHARED_MODEL_KEYS: [&str; 4] = ["model", "device", "dtype", "threads"];

#[derive(Parser)]
struct Stage<T: clap::Args> {
    #[command(flatten)]
    args: T,
}

/// Parses a stage's flags as its own command would.
fn parse_stage<T: clap::Args>(stage: &str, argv: Vec<String>) -> Result<T> {
    Stage::<T>::try_parse_from(std::iter::once(format!("sae {stage}")).chain(argv))
        .map(|s| s.args)
        .map_err(|e| anyhow!("the [{stage}] settings are not valid flags of `sae {stage}`: {e}"))
}

struct Plan {
    dir: String,
    tables: toml::Table,
    shared: Vec<String>,
    source: String,
}

/// Refuses a setting that holds a URL with user info (`s3://KEY:SECRET@bucket/...`) before
/// anything prints it, as `main` does for command-line arguments; the message is redacted.
fn refuse_credentials(value: &toml::Value, source: &str) -> Result<()> {
    match value {
        toml::Value::String(text) if store::has_user_info(text) => {
            bail!("in {source}: {}", crate::credentials_refusal(text))
        }
        toml::Value::Table(table) => table.values().try_for_each(|v| refuse_credentials(v, source)),
        toml::Value::Array(items) => items.iter().try_for_each(|v| refuse_credentials(v, source)),
        _ => Ok(()),
    }
}

impl Plan {
    fn load(args: &Args) -> Result<Plan> {
        let (mut table, source): (toml::Table, String) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file `{}`", path.display()))?;
                (
                    text.parse().with_context(|| format!("config file `{}` is not valid TOML", path.display()))?,
                    path.display().to_string(),
                )
            }
            None => (toml::Table::new(), "the built-in defaults".into()),
        };
        // A corpus of one's own replaces the default multilingual fortunes.
        let own_corpus =
            table.get("capture").is_some_and(|c| c.get("corpus").is_some() || c.get("corpus_format").is_some());
        let defaults: toml::Table = DEFAULTS.parse().expect("valid defaults");
        // Per key: a file's [train] with only `k` keeps the default width, steps and rate.
        for (stage, settings) in defaults {
            let toml::Value::Table(settings) = settings else { continue };
            if let toml::Value::Table(given) =
                table.entry(stage).or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                for (key, value) in settings {
                    given.entry(key).or_insert(value);
                }
            }
        }
        if own_corpus {
            if let Some(toml::Value::Table(capture)) = table.get_mut("capture") {
                if capture.get("fortune_languages") == defaults_fortune_languages().as_ref() {
                    capture.remove("fortune_languages");
                }
            }
        }
        refuse_credentials(&toml::Value::Table(table.clone()), &source)?;
        let known = ["dir", "capture", "train", "eval", "features"];
        for key in table.keys() {
            if !known.contains(&key.as_str()) && !SHARED_MODEL_KEYS.contains(&key.as_str()) {
                bail!("unknown key `{key}` in {source}: expected dir, {}, or the tables [capture], [train], [eval], [features]", SHARED_MODEL_KEYS.join(", "));
            }
        }
        let dir = match (&args.dir, table.get("dir")) {
            (Some(d), _) => d.clone(),
            (None, Some(toml::Value::String(d))) => d.clone(),
            (None, Some(other)) => bail!("`dir` in {source} must be a string, not {}", other.type_str()),
            (None, None) => "runs/sae-run".into(),
        };
        let mut shared_table = toml::Table::new();
        for key in SHARED_MODEL_KEYS {
            if let Some(v) = table.get(key) {
                shared_table.insert(key.to_string(), v.clone());
            }
        }
        let shared = toml_flags(&shared_table, &source)?;
        Ok(Plan { dir: dir.trim_end_matches('/').to_string(), tables: table, shared, source })
    }

    /// A string setting of the [capture] table.
    fn capture_setting(&self, key: &str) -> Option<String> {
        self.tables.get("capture")?.get(key)?.as_str().map(str::to_string)
    }

    fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.dir)
    }

    /// The flags of one stage's table, after `fixed` and the shared model flags.
    fn flags(&self, stage: &str, fixed: &[&str], with_model: bool) -> Result<Vec<String>> {
        let mut argv: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
        if with_model {
            argv.extend(self.shared.iter().cloned());
        }
        match self.tables.get(stage) {
            None => {}
            Some(toml::Value::Table(t)) => argv.extend(toml_flags(t, &self.source)?),
            Some(other) => bail!("`{stage}` in {} must be a table, not {}", self.source, other.type_str()),
        }
        Ok(argv)
    }
}

pub fn run(args: Args) -> Result<()> {
    let plan = Plan::load(&args)?;
    let store = StoreOptions::default();
    let (data, sae, features, browser) =
        (plan.path("data"), plan.path("sae"), plan.path("features"), plan.path("browser"));
    println!("== sae run: {} (settings from {}) ==", plan.dir, plan.source);

    println!("== 1/5 capture → {data} ==");
    crate::cmd::capture::run(parse_stage("capture", plan.flags("capture", &["--out", &data], true)?)?)?;

    println!("== 2/5 train → {sae} ==");
    crate::cmd::train::run(parse_stage(
        "train",
        plan.flags("train", &["--data", &data, "--out", &sae, "--no-eval"], true)?,
    )?)?;

    println!("== 3/5 eval → {sae}/{EVAL_FILE} ==");
    let sae_dir = ObjectDir::open(&sae, &store)?;
    let report: EvalReport = match sae_dir.get(EVAL_FILE)? {
        Some(bytes) => {
            println!("already evaluated ({})", sae_dir.display(EVAL_FILE));
            serde_json::from_slice(&bytes)
                .with_context(|| format!("`{}` is not an eval report", sae_dir.display(EVAL_FILE)))?
        }
        None => {
            let eval: EvalArgs = parse_stage("eval", plan.flags("eval", &[], false)?)?;
            let model: ModelArgs = parse_stage("model", plan.shared.clone())?;
            evaluate(&sae, &data, &eval, &model, &store)?
        }
    };
    crate::cmd::eval::print_report(&report);

    println!("== 4/5 features build → {features} ==");
    // The features of a multilingual capture are traced to the languages of their examples.
    let languages = plan.capture_setting("fortune_languages");
    let mut fixed: Vec<&str> = vec!["--sae", &sae, "--data", &data, "--out", &features];
    if let Some(languages) = &languages {
        fixed.extend(["--fortune-languages", languages.as_str()]);
    }
    let build: BuildArgs = parse_stage("features", plan.flags("features", &fixed, true)?)?;
    let summary = run_build(&build, &store)?;

    println!("== 5/5 browse → {browser} ==");
    let index = browse(
        &BrowseArgs {
            features: features.clone(),
            out: PathBuf::from(&browser),
            max_density: crate::features::ranking::DEFAULT_MAX_DENSITY,
        },
        &store,
    )?;

    let (manifest, _) = store::load_manifest(&data, &store)?;
    let r = &report.reconstruction;
    println!();
    println!("{:<10} {:<40} result", "stage", "output");
    let row = |stage: &str, output: &str, result: String| println!("{stage:<10} {output:<40} {result}");
    row(
        "capture",
        &data,
        format!(
            "{} tokens of {} · {:.3} bytes/element",
            manifest.tokens,
            manifest.corpus.name,
            manifest.bytes_per_element()
        ),
    );
    row("train", &sae, format!("{} latents on {}", summary.d_sae, report.hook));
    row(
        "eval",
        &format!("{sae}/{EVAL_FILE}"),
        format!(
            "FVU {:.3} · L0 {:.1} · dead {:.1}% · CE-loss score {:.3}",
            r.fvu,
            r.l0,
            100.0 * r.dead_fraction,
            report.ce.ce_loss_score
        ),
    );
    row(
        "features",
        &features,
        format!(
            "{} alive · {} dead over {} tokens",
            summary.d_sae - summary.dead.len(),
            summary.dead.len(),
            summary.rows
        ),
    );
    row("browse", &browser, format!("{} pages", summary.d_sae + 1));
    println!();
    println!("next: sae features search --sae {sae} --features {features} --prompt \"...\"");
    println!("      sae steer --sae {sae} --features {features} --feature N --clamp 2x --prompt \"...\"");
    println!("feature browser: {}", index.display());
    Ok(())
}
