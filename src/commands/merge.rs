//! `nuwa merge`: the average of a run's last K checkpoints, as a new run (or an HF folder).

use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use clap::Args;
use nuwa_model::weights::assign_weights;
use nuwa_model::LanguageModel;
use nuwa_run::checkpoint;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct MergeArgs {
    /// The run folder whose checkpoints are merged.
    run_dir: PathBuf,
    /// How many of the newest checkpoints to average.
    #[arg(long, default_value_t = 3)]
    last: usize,
    /// The folder to create (must not exist or be empty): a run folder, or with --hf a
    /// Hugging Face folder.
    #[arg(long)]
    out: PathBuf,
    /// Write a Hugging Face folder (f32) instead of a run folder.
    #[arg(long)]
    hf: bool,
}

/// Copies the run's side files (config, tokenizer, imported HF files) into `to`.
fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let side = name == "config.toml" || name.starts_with("tokenizer");
        if side && entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(&*name))?;
        }
    }
    let hf = from.join(nuwa_hf::HF_SUBDIR);
    if hf.is_dir() {
        std::fs::create_dir_all(to.join(nuwa_hf::HF_SUBDIR))?;
        for entry in std::fs::read_dir(&hf)? {
            let entry = entry?;
            std::fs::copy(
                entry.path(),
                to.join(nuwa_hf::HF_SUBDIR).join(entry.file_name()),
            )?;
        }
    }
    Ok(())
}

fn write_run(run: &Path, out: &Path, last: usize) -> Result<u64> {
    let merged = checkpoint::merge_last(run, last)?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    copy_side_files(run, out)?;
    let cfg = &merged.state.config.model;
    let what = format!("merge of {}", run.display());
    let model = assign_weights(
        LanguageModel::uninitialised(cfg, &Device::default()),
        &merged.weights,
        &what,
    )?;
    let step = merged.state.step;
    checkpoint::save(out, &model, merged.optimizer, merged.state, 1)?;
    Ok(step)
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let non_empty = std::fs::read_dir(&a.out).is_ok_and(|mut d| d.next().is_some());
    if non_empty {
        bail!(
            "{}: already exists and is not empty; choose a new folder",
            a.out.display()
        );
    }
    if !a.hf {
        let step = write_run(&a.run_dir, &a.out, a.last)?;
        println!(
            "merged the last {} checkpoints of {} (up to step {step}) into run {}",
            a.last,
            a.run_dir.display(),
            a.out.display()
        );
        return Ok(());
    }
    let tmp = a.out.with_file_name(format!(
        ".{}.merge-{}",
        a.out
            .file_name()
            .map_or("out".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_run(&a.run_dir, &tmp, a.last)
        .and_then(|_| nuwa_hf::export_run(&tmp, &a.out, &nuwa_hf::ExportOptions::default()));
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    println!(
        "merged the last {} checkpoints of {} into Hugging Face folder {}",
        a.last,
        a.run_dir.display(),
        a.out.display()
    );
    Ok(())
}
