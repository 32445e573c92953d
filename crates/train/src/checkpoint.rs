//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holding `model.safetensors`,
//! `optimizer.safetensors` and `trainer.json` (step, data cursor, config, checksums).
//! A checkpoint is written into a temporary folder, every file fsynced, then renamed into
//! place, so a failed or interrupted save never touches the last good one.

use crate::config::RunConfig;
use crate::optim::{AdamW, Moments};
use crate::weights::{collect_weights, from_safetensors, to_safetensors, HostTensor};
use anyhow::{anyhow, bail, Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use nuwa_data::shards::sha256_hex;
use nuwa_data::BatchSampler;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    pub sampler: BatchSampler,
    pub tokens_seen: u64,
    pub config: RunConfig,
    /// SHA-256 of each file in the checkpoint.
    pub checksums: BTreeMap<String, String>,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Completed checkpoints of a run, oldest first.
pub fn list_checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir(run))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("{}: write failed", path.display()))?;
    f.sync_all()
        .with_context(|| format!("{}: fsync failed", path.display()))?;
    Ok(())
}

fn optimizer_tensors(opt: &AdamW) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for (name, m) in &opt.state {
        out.insert(
            format!("{name}.exp_avg"),
            HostTensor::from_tensor(m.exp_avg.clone()),
        );
        out.insert(
            format!("{name}.exp_avg_sq"),
            HostTensor::from_tensor(m.exp_avg_sq.clone()),
        );
    }
    out
}

/// Saves a checkpoint atomically and prunes old ones beyond `keep`.
pub fn save<M: Module>(
    run: &Path,
    model: &M,
    opt: &AdamW,
    mut state: TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
    let final_dir = root.join(step_dir_name(state.step));
    let tmp_dir = root.join(format!(
        ".tmp-{}-{}",
        step_dir_name(state.step),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir)?;
        let model_bytes = to_safetensors(&collect_weights(model))?;
        let opt_bytes = to_safetensors(&optimizer_tensors(opt))?;
        state.checksums = BTreeMap::from([
            (MODEL_FILE.to_string(), sha256_hex(&model_bytes)),
            (OPTIMIZER_FILE.to_string(), sha256_hex(&opt_bytes)),
        ]);
        write_synced(&tmp_dir.join(MODEL_FILE), &model_bytes)?;
        write_synced(&tmp_dir.join(OPTIMIZER_FILE), &opt_bytes)?;
        write_synced(
            &tmp_dir.join(TRAINER_FILE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp_dir, &final_dir)?;
        if let Ok(d) = std::fs::File::open(&root) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp_dir);
        return Err(e.context(format!("saving checkpoint {}", final_dir.display())));
    }
    let all = list_checkpoints(run);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// A checkpoint read back from disk and verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub weights: BTreeMap<String, HostTensor>,
    pub optimizer: BTreeMap<String, HostTensor>,
}

fn read_verified(dir: &Path, file: &str, state: &TrainerState) -> Result<Vec<u8>> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let expected = state.checksums.get(file).ok_or_else(|| {
        anyhow!(
            "{}: no checksum recorded for {file}",
            dir.join(TRAINER_FILE).display()
        )
    })?;
    if &sha256_hex(&bytes) != expected {
        bail!(
            "{}: checksum mismatch: the file is truncated or corrupted",
            path.display()
        );
    }
    Ok(bytes)
}

/// Loads the newest checkpoint of a run (or the given checkpoint folder).
pub fn load_latest(run: &Path) -> Result<Loaded> {
    let dir = if run.join(TRAINER_FILE).exists() {
        run.to_path_buf()
    } else {
        list_checkpoints(run).pop().map(|(_, d)| d).ok_or_else(|| {
            anyhow!(
                "{}: no checkpoint found (expected {}/step-*)",
                run.display(),
                checkpoints_dir(run).display()
            )
        })?
    };
    let trainer_path = dir.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&trainer_path)
        .with_context(|| format!("{}: cannot read", trainer_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: garbled trainer state: {e}", trainer_path.display()))?;
    let weights = from_safetensors(
        &read_verified(&dir, MODEL_FILE, &state)?,
        &dir.join(MODEL_FILE).display().to_string(),
    )?;
    let optimizer = from_safetensors(
        &read_verified(&dir, OPTIMIZER_FILE, &state)?,
        &dir.join(OPTIMIZER_FILE).display().to_string(),
    )?;
    Ok(Loaded {
        dir,
        state,
        weights,
        optimizer,
    })
}

/// Rebuilds optimiser moments from a checkpoint's tensors.
pub fn restore_optimizer(
    opt: &mut AdamW,
    step: u64,
    tensors: &BTreeMap<String, HostTensor>,
    device: &Device,
) -> Result<()> {
    opt.step = step;
    opt.state.clear();
    let to_tensor = |t: &HostTensor| {
        Tensor::<1>::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device)
    };
    for (key, avg) in tensors {
        let Some(name) = key.strip_suffix(".exp_avg") else {
            continue;
        };
        let sq = tensors
            .get(&format!("{name}.exp_avg_sq"))
            .ok_or_else(|| anyhow!("optimizer state: {name}.exp_avg_sq is missing"))?;
        opt.state.insert(
            name.to_string(),
            Moments {
                exp_avg: to_tensor(avg),
                exp_avg_sq: to_tensor(sq),
            },
        );
    }
    Ok(())
}
