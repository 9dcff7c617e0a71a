//! `sae features`: read an SAE's features.

use anyhow::{bail, Result};
use store::StoreOptions;
use tch::Device;

use crate::cmd::eval::load_sae;
use crate::features::neighbors::{nearest, unit_rows, Neighbor};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Nearest features by the cosine similarity of their decoder rows.
    Neighbors(NeighborArgs),
}

#[derive(clap::Args, Debug)]
struct NeighborArgs {
    /// The SAE's folder (cfg.json + sae_weights.safetensors), a path or URL.
    #[arg(long)]
    sae: String,
    /// The feature (latent index) to find neighbours of.
    #[arg(long)]
    feature: i64,
    /// How many neighbours.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Look for neighbours in this SAE instead (for example one of another width).
    #[arg(long)]
    other_sae: Option<String>,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Neighbors(a) => neighbors(a),
    }
}

fn neighbors(a: NeighborArgs) -> Result<()> {
    let store = StoreOptions::default();
    let sae = load_sae(&a.sae, &store, Device::Cpu)?;
    let d_sae = sae.sae.config().d_sae as i64;
    if a.feature < 0 || a.feature >= d_sae {
        bail!("feature {} is out of range: the SAE at `{}` has features 0..{}", a.feature, a.sae, d_sae - 1);
    }
    let rows = unit_rows(sae.sae.w_dec());
    let query = rows.get(a.feature);
    let (target_url, found): (&str, Vec<Neighbor>) = match &a.other_sae {
        None => (&a.sae, nearest(&query, &rows, a.top, Some(a.feature))?),
        Some(other) => {
            let other_sae = load_sae(other, &store, Device::Cpu)?;
            if other_sae.info.hook_name != sae.info.hook_name {
                tracing::warn!("the SAEs read different hooks: {} and {}", sae.info.hook_name, other_sae.info.hook_name);
            }
            (other, nearest(&query, &unit_rows(other_sae.sae.w_dec()), a.top, None)?)
        }
    };
    println!("nearest features to feature {} of {} in {}:", a.feature, a.sae, target_url);
    for n in &found {
        println!("  {:>8}  cosine {:+.4}", n.feature, n.cosine);
    }
    if a.json {
        let out = serde_json::json!({ "sae": a.sae, "feature": a.feature, "in": target_url, "neighbors": found });
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
