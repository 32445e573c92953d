//! `nuwa export`: a run's newest checkpoint as a Hugging Face folder.

use crate::args::byte_size;
use anyhow::Result;
use clap::{Args, ValueEnum};
use nuwa_hf::ExportDtype;
use std::path::PathBuf;

/// `--dtype`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The run folder (its newest checkpoint is exported).
    run_dir: PathBuf,
    /// The Hugging Face folder to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Element type of the written weights (f32 is exact).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Largest safetensors file before the weights are sharded: 5GB, 500MB, 2000000.
    #[arg(long, default_value = "5GB", value_parser = byte_size)]
    max_shard_size: u64,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let dtype = match a.dtype {
        DtypeArg::F32 => ExportDtype::F32,
        DtypeArg::Bf16 => ExportDtype::Bf16,
        DtypeArg::F16 => ExportDtype::F16,
    };
    let options = nuwa_hf::ExportOptions {
        dtype,
        max_shard_bytes: a.max_shard_size,
    };
    nuwa_hf::export_run(&a.run_dir, &a.out, &options)?;
    println!("exported {} to {}", a.run_dir.display(), a.out.display());
    Ok(())
}
