//! `nuwa data prepare`: tokenize text into train/val shards plus a manifest.

use anyhow::Result;
use clap::{Args, Subcommand};
use nuwa_data::{PrepareOptions, Source, TokenizerSpec};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize text into train/val shards plus a manifest.
    Prepare(PrepareArgs),
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Text files or folders; none means the built-in corpus.
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    /// byte | char | bpe:N | path/to/tokenizer.json
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// Output folder.
    #[arg(long, default_value = "data/prepared")]
    out: PathBuf,
    /// Fraction of tokens held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Replace a folder that already holds prepared data (runs trained on it will refuse to
    /// resume unless given --allow-data-change).
    #[arg(long)]
    force: bool,
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    let source = if a.input.is_empty() {
        Source::Builtin
    } else {
        Source::Paths(a.input)
    };
    let manifest = nuwa_data::prepare(&PrepareOptions {
        source,
        tokenizer: a.tokenizer.parse::<TokenizerSpec>()?,
        out_dir: a.out.clone(),
        val_fraction: a.val_fraction,
        force: a.force,
    })?;
    println!(
        "wrote {}: vocab {}, {} train + {} val tokens ({:?})",
        a.out.display(),
        manifest.vocab_size,
        manifest.train.tokens,
        manifest.val.tokens,
        manifest.dtype
    );
    Ok(())
}
