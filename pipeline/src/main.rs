//! `sae`: the sparse-autoencoder pipeline's command-line program.

use clap::{Parser, Subcommand};

mod capture_rows;
mod ce_score;
mod cmd;
mod corpus_source;
mod features;
mod model_args;
mod workers;

/// Capture a language model's activations, store them as datasets, and work with the results.
///
/// Logs go to stderr (set RUST_LOG=debug for more); results go to stdout.
#[derive(Parser)]
#[command(name = "sae", version, about, long_about = None, propagate_version = true, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt (greedy by default); prints only the continuation.
    Generate(cmd::generate::Args),
    /// Run the model over text and report statistics of one hook's activations.
    Activations(cmd::activations::Args),
    /// Capture a model's activations at one or more hooks over a corpus into a dataset.
    Capture(cmd::capture::Args),
    /// Inspect and verify activation datasets.
    Dataset(cmd::dataset::Args),
    /// Train a sparse autoencoder (or a sweep of them in one pass) on an activation dataset.
    Train(cmd::train::Args),
    /// Evaluate a trained SAE: FVU, L0, dead latents, feature density and the CE-loss score.
    Eval(cmd::eval::Args),
    /// Read a trained SAE's features: build statistics and examples, search a prompt, find
    /// neighbours, write a browser.
    Features(cmd::features::Args),
    /// Generate with features clamped or pushed, next to the unsteered generation.
    Steer(cmd::steer::Args),
    /// The whole flow on one configuration: capture, train, eval, features build, browse.
    /// Reuses finished stages and resumes interrupted ones.
    Run(cmd::run::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    // `sae train --config FILE` reads flags from TOML (`sae run --config` has its own format).
    let argv: Vec<String> = std::env::args().collect();
    let argv =
        if argv.get(1).map(String::as_str) == Some("train") { cmd::train::expand_config(argv) } else { Ok(argv) };
    let argv = match argv {
        Ok(argv) => argv,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(2);
        }
    };
    refuse_credentials_in_urls(&argv);
    let cli = Cli::parse_from(argv);
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Activations(args) => cmd::activations::run(args),
        Command::Capture(args) => cmd::capture::run(args),
        Command::Dataset(args) => cmd::dataset::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Features(args) => cmd::features::run(args),
        Command::Steer(args) => cmd::steer::run(args),
        Command::Run(args) => cmd::run::run(args),
    };
    if let Err(err) = result {
        // Errors quote URLs, some of them from libraries (an HTTP client quotes its request URL):
        // remove any user info that could be a credential.
        eprintln!("error: {}", store::redact_urls_in(&format!("{err:#}")));
        std::process::exit(1);
    }
}

/// Why `text`, which holds a URL with user info, is refused; the URL is quoted without it.
pub fn credentials_refusal(text: &str) -> String {
    format!(
        "`{}`: credentials are not accepted in URLs; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile) instead",
        store::redact_urls_in(text)
    )
}

/// Exits with a clear error, before any command runs, when an argument holds a URL with user
/// info (`s3://KEY:SECRET@bucket/...`): no store takes credentials in URLs, and refusing here
/// keeps every later message, log line and JSON output from quoting them.
fn refuse_credentials_in_urls(argv: &[String]) {
    if let Some(arg) = argv.iter().find(|a| store::has_user_info(a)) {
        eprintln!("error: {}", credentials_refusal(arg));
        std::process::exit(2);
    }
}
