use anyhow::{bail, Result};
use store::StoreOptions;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: DatasetCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DatasetCommand {
    /// Describe a dataset: tokens, hooks, dtype, shards, bytes, and where it came from.
    Info {
        /// Dataset location: a path, file://, s3://bucket/prefix (AWS_* variables) or memory://.
        url: String,
        /// Print exactly one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Merge the parts that several capture workers committed into one manifest. Refuses
    /// unless every worker has finished its share (its `parts/<worker>.json` exists).
    Finalize {
        url: String,
        /// The number of capture workers the dataset was split over; finalize refuses unless
        /// all of them have finished. Without it, the count the workers recorded is used.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Check every shard's checksum, schema and row count; names each bad shard.
    Verify {
        url: String,
        /// Shards checked at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> Result<()> {
    let options = StoreOptions::default();
    match args.command {
        DatasetCommand::Info { url, json } => {
            let info = store::info(&url, &options)?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
                return Ok(());
            }
            println!("dataset        {} ({})", info.url, info.dataset_id);
            println!("state          {}", if info.is_final { "final" } else { "being written" });
            println!("tokens         {}", info.tokens);
            for hook in &info.hooks {
                println!("hook           {} (d_model {})", hook.name, hook.d_model);
            }
            println!("dtype          {}", info.dtype.name());
            println!("context_len    {}", info.context_len);
            println!("shards         {}", info.shards);
            println!("bytes          {} ({:.3} B/elem)", info.bytes, info.bytes_per_element);
            println!("model          {}", serde_json::to_string(&info.model)?);
            println!("corpus         {}", serde_json::to_string(&info.corpus)?);
            println!("created        {}", serde_json::to_string(&info.created)?);
            Ok(())
        }
        DatasetCommand::Finalize { url, workers } => {
            let manifest = store::finalize(&url, &options, workers)?;
            println!("finalized {url}: {} tokens in {} shards", manifest.tokens, manifest.shards.len());
            Ok(())
        }
        DatasetCommand::Verify { url, concurrency, json } => {
            let report = store::verify(&url, &options, concurrency.max(1))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "checked {} shards, {} rows, {} bytes",
                    report.shards_checked, report.rows_checked, report.bytes_checked
                );
                for bad in &report.bad_shards {
                    for problem in &bad.problems {
                        println!("BAD {}: {problem}", bad.key);
                    }
                }
                for key in &report.unlisted {
                    println!("UNLISTED {key}: a .parquet object the manifest does not list");
                }
            }
            if !report.ok {
                let keys: Vec<&str> = report
                    .bad_shards
                    .iter()
                    .map(|b| b.key.as_str())
                    .chain(report.unlisted.iter().map(String::as_str))
                    .collect();
                bail!("dataset {url} failed verification: {}", keys.join(", "));
            }
            Ok(())
        }
    }
}
