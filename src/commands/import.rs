//! `nuwa import`: a Hugging Face checkpoint folder into a nuwa run folder.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImportArgs {
    /// The Hugging Face folder: config.json, *.safetensors (or shards + index), tokenizer.json.
    hf_dir: PathBuf,
    /// The run folder to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

pub fn import(a: ImportArgs) -> Result<()> {
    let device = burn::tensor::Device::default();
    let dir = nuwa_hf::import_to_run(&a.hf_dir, &a.out, &device)?;
    println!(
        "imported {} into {} ({})",
        a.hf_dir.display(),
        a.out.display(),
        dir.display()
    );
    Ok(())
}
