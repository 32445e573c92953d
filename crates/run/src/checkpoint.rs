//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holding `model.safetensors`,
//! `optimizer.safetensors` and `trainer.json` (step, data cursor, config, checksums).
//! A checkpoint is written into a temporary folder, every file fsynced, then renamed into
//! place, so a failed or interrupted save never touches the last good one.

use crate::config::RunConfig;
use crate::sharded::{assemble, ShardRecord};
use anyhow::{anyhow, bail, Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use nuwa_core::{sha256_hex, write_synced};
use nuwa_data::{BatchSampler, Tokenizer};
use nuwa_model::names::upgrade_names;
use nuwa_model::weights::{
    assign_weights, collect_weights, from_safetensors, to_safetensors, HostTensor,
};
use nuwa_model::LanguageModel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";

/// What the checkpoint's numbers mean, recorded in `trainer.json` as `format`:
/// - 0 (absent; nuwa before this field): NormHead normalised each vocab row, and `use_bias`
///   put biases on the attention output and every MLP;
/// - 3: NormHead as Ant computes it (over dim 0 of `[vocab, hidden]`), `use_bias` on the
///   attention output only and `mlp_bias` for MLPs. (Parameter *names* have their own versions,
///   converted by `nuwa_model::names`.)
pub const CHECKPOINT_FORMAT: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    pub sampler: BatchSampler,
    pub tokens_seen: u64,
    pub config: RunConfig,
    /// SHA-256 of each file in the checkpoint.
    pub checksums: BTreeMap<String, String>,
    /// [`CHECKPOINT_FORMAT`] when written; 0 for checkpoints older than the field.
    #[serde(default)]
    pub format: u32,
    /// Loss-spike handling's state (trend, skipped steps, deferred data).
    #[serde(default)]
    pub spikes: crate::SpikeGuard,
    /// The data the run trained on (absent: a checkpoint from before the field, or none).
    #[serde(default)]
    pub data: Option<DataRecord>,
    /// A model split across processes: each rank's files (`crate::sharded`). Empty: the
    /// checkpoint is `model.safetensors` and `optimizer.safetensors`, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardRecord>,
}

/// The token shards a run trained on, by their manifest's SHA-256: a resume notices when the
/// data was prepared again under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRecord {
    pub dir: String,
    pub train_sha256: String,
    pub val_sha256: String,
}

impl DataRecord {
    pub fn of(data: &nuwa_data::Dataset) -> Self {
        Self {
            dir: data.dir.display().to_string(),
            train_sha256: data.manifest.train.sha256.clone(),
            val_sha256: data.manifest.val.sha256.clone(),
        }
    }

    /// What differs between the data recorded (`self`) and `now`, in words; `None`: the same.
    pub fn changes(&self, now: &DataRecord) -> Option<String> {
        let short = |h: &str| h.chars().take(12).collect::<String>();
        let differ = [
            ("train.bin", &self.train_sha256, &now.train_sha256),
            ("val.bin", &self.val_sha256, &now.val_sha256),
        ]
        .into_iter()
        .filter(|(_, was, is)| was != is)
        .map(|(file, was, is)| format!("{file} sha256 {}… was {}…", short(is), short(was)))
        .collect::<Vec<_>>();
        (!differ.is_empty()).then(|| differ.join(", "))
    }
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

pub(crate) fn step_dir_name(step: u64) -> String {
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

/// A checkpoint's contents copied to host memory: what [`write`] puts on disk. Taking it is
/// the only part of a save that must stop training; the write can happen in the background.
pub struct Snapshot {
    pub weights: BTreeMap<String, HostTensor>,
    /// The optimiser's state by name (`PARAM.exp_avg`, `PARAM.exp_avg_sq`).
    pub optimizer: BTreeMap<String, HostTensor>,
    pub state: TrainerState,
}

impl Snapshot {
    /// Copies `model` to the host, refusing a non-finite parameter: a checkpoint of it would
    /// poison every resume.
    pub fn take<M: Module>(
        model: &M,
        optimizer: BTreeMap<String, HostTensor>,
        state: TrainerState,
    ) -> Result<Self> {
        Self::of(collect_weights(model), optimizer, state)
    }

    /// A snapshot of weights already on the host, refusing a non-finite one.
    pub fn of(
        weights: BTreeMap<String, HostTensor>,
        optimizer: BTreeMap<String, HostTensor>,
        state: TrainerState,
    ) -> Result<Self> {
        if let Some((name, _)) = weights
            .iter()
            .find(|(_, t)| t.data.iter().any(|x| !x.is_finite()))
        {
            bail!(
                "step {}: parameter {name} is not finite; a checkpoint of it would poison the run",
                state.step
            );
        }
        Ok(Self {
            weights,
            optimizer,
            state,
        })
    }
}

/// Saves a checkpoint atomically and prunes old ones beyond `keep`. `optimizer` holds the
/// optimiser's state by name (`PARAM.exp_avg`, `PARAM.exp_avg_sq`).
pub fn save<M: Module>(
    run: &Path,
    model: &M,
    optimizer: BTreeMap<String, HostTensor>,
    state: TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    write(run, Snapshot::take(model, optimizer, state)?, keep)
}

/// Writes `snapshot` as `RUN/checkpoints/step-N` atomically (a temporary folder, every file
/// fsynced, checksums in trainer.json, then a rename) and prunes old ones beyond `keep`.
pub fn write(run: &Path, snapshot: Snapshot, keep: usize) -> Result<PathBuf> {
    let Snapshot {
        weights,
        optimizer,
        mut state,
    } = snapshot;
    let root = checkpoints_dir(run);
    std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
    let final_dir = root.join(step_dir_name(state.step));
    let tmp_dir = root.join(format!(
        ".tmp-{}-{}",
        step_dir_name(state.step),
        std::process::id()
    ));
    state.format = CHECKPOINT_FORMAT;
    // Whole files: a state read from a sharded checkpoint (a merge of one) names no shards.
    state.shards.clear();
    let result = (|| -> Result<()> {
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir)?;
        let model_bytes = to_safetensors(&weights)?;
        let opt_bytes = to_safetensors(&optimizer)?;
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
    prune(run, keep);
    Ok(final_dir)
}

/// Removes the oldest checkpoints beyond the newest `keep`.
pub(crate) fn prune(run: &Path, keep: usize) {
    let root = checkpoints_dir(run);
    let all = list_checkpoints(run);
    for (step, old) in all.iter().take(all.len().saturating_sub(keep)) {
        // Renamed out of the checkpoint names first: a prune killed half-way leaves a
        // `.tmp-` folder (removed on the next start), never a half-deleted checkpoint.
        let doomed = root.join(format!(".tmp-prune-{}", step_dir_name(*step)));
        if std::fs::rename(old, &doomed).is_ok() {
            let _ = std::fs::remove_dir_all(&doomed);
        }
    }
}

/// Removes what killed saves and prunes left behind (`checkpoints/.tmp-*`); called with the
/// run's lock held, so no save of this run is in flight. Returns how many were removed.
pub fn remove_leftovers(run: &Path) -> usize {
    let entries = std::fs::read_dir(checkpoints_dir(run))
        .into_iter()
        .flatten()
        .flatten();
    entries
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}

/// A checkpoint read back from disk and verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub weights: BTreeMap<String, HostTensor>,
    pub optimizer: BTreeMap<String, HostTensor>,
}

impl Loaded {
    /// Whether the model was trained with nuwa's old NormHead (per vocab row), which today's
    /// `norm_head` (Ant's, per hidden index) would silently reinterpret.
    pub fn has_old_norm_head(&self) -> bool {
        self.state.format < 3 && self.state.config.model.norm_head
    }

    /// Refuses to go on training a model whose head meant something else then.
    pub fn check_resumable(&self) -> Result<()> {
        if self.has_old_norm_head() {
            bail!(
                "{}: trained with nuwa's NormHead before checkpoint format 3 (each vocab row \
                 normalised, not each hidden index as Ant's Ling does); training on would change \
                 the model. sample, serve and export still compute it exactly; to train on, \
                 `nuwa export` it and `nuwa import` the export into a new run",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// For inference and export: a model trained with the old NormHead becomes a plain head
    /// holding the old normalised weights (the same logits, exactly), with one note on stderr.
    pub fn bake_old_norm_head(&mut self) -> Result<()> {
        if !self.has_old_norm_head() {
            return Ok(());
        }
        let model = &mut self.state.config.model;
        let (hidden, vocab) = (model.hidden_size, model.vocab_size);
        // nuwa keeps the head as `[hidden, vocab]`; a tied head is the embeddings transposed.
        let mut head = match self.weights.get("lm_head.weight") {
            Some(t) if !model.tie_word_embeddings => t.data.clone(),
            _ => {
                let emb = self
                    .weights
                    .get("word_embeddings.weight")
                    .ok_or_else(|| anyhow!("{}: no word_embeddings.weight", self.dir.display()))?;
                if emb.data.len() != hidden * vocab {
                    bail!(
                        "{}: word_embeddings.weight is not [{vocab}, {hidden}]",
                        self.dir.display()
                    );
                }
                let mut head = vec![0.0; hidden * vocab];
                for (v, row) in emb.data.chunks(hidden).enumerate() {
                    for (i, x) in row.iter().enumerate() {
                        head[i * vocab + v] = *x;
                    }
                }
                head
            }
        };
        if head.len() != hidden * vocab {
            bail!(
                "{}: lm_head.weight is not [{hidden}, {vocab}]",
                self.dir.display()
            );
        }
        for v in 0..vocab {
            let norm = (0..hidden)
                .map(|i| head[i * vocab + v].powi(2))
                .sum::<f32>()
                .sqrt()
                .max(1e-7);
            for i in 0..hidden {
                head[i * vocab + v] /= norm;
            }
        }
        let shape = vec![hidden, vocab];
        self.weights
            .insert("lm_head.weight".into(), HostTensor { shape, data: head });
        model.norm_head = false;
        model.tie_word_embeddings = false;
        eprintln!(
            "note: {}: trained with nuwa's NormHead before checkpoint format 3; its normalised \
             head is used as a plain LM head (norm_head = false), which computes the same logits",
            self.dir.display()
        );
        Ok(())
    }
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

type Tensors = BTreeMap<String, HostTensor>;

/// The tensors of one verified safetensors file of a checkpoint.
fn read_raw(dir: &Path, file: &str, state: &TrainerState) -> Result<Tensors> {
    let path = dir.join(file).display().to_string();
    from_safetensors(&read_verified(dir, file, state)?, &path)
}

/// The tensors of one verified safetensors file of a checkpoint, old names converted.
fn read_tensors(dir: &Path, file: &str, state: &TrainerState) -> Result<Tensors> {
    let path = dir.join(file).display().to_string();
    upgrade_names(read_raw(dir, file, state)?).map_err(|e| anyhow!("{path}: {e}"))
}

/// The whole weights and optimiser moments of a sharded checkpoint, assembled from every
/// rank's verified files.
fn read_shards(dir: &Path, state: &TrainerState) -> Result<(Tensors, Tensors)> {
    let (mut weights, mut moments) = (Vec::new(), Vec::new());
    for shard in &state.shards {
        weights.push((read_raw(dir, &shard.model, state)?, &shard.parts));
        moments.push((read_raw(dir, &shard.optimizer, state)?, &shard.parts));
    }
    let what = dir.display().to_string();
    let upgrade = |t| upgrade_names(t).map_err(|e| anyhow!("{what}: {e}"));
    Ok((
        upgrade(assemble(weights, &what)?)?,
        upgrade(assemble(moments, &what)?)?,
    ))
}

/// Refuses a checkpoint folder given where a run folder belongs, naming the run.
pub fn refuse_checkpoint_dir(run: &Path, flag: &str) -> Result<()> {
    if run.join(TRAINER_FILE).exists() {
        let owner = run.parent().and_then(Path::parent).unwrap_or(run);
        bail!(
            "{flag}{}: is a checkpoint, not a run folder; pass the run folder ({}) — a run \
             resumes from its newest checkpoint",
            run.display(),
            owner.display()
        );
    }
    Ok(())
}

/// The trainer state of a run's newest checkpoint, without reading its weights.
pub fn latest_state(run: &Path) -> Result<TrainerState> {
    let (_, dir) = list_checkpoints(run).pop().ok_or_else(|| {
        anyhow!(
            "{}: no checkpoint found (expected {}/step-*)",
            run.display(),
            checkpoints_dir(run).display()
        )
    })?;
    let path = dir.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: garbled trainer state: {e}", path.display()))
}

/// Loads the newest checkpoint of a run (or the given checkpoint folder). Parameter names of
/// older versions are converted on load (`nuwa_model::names`), model and optimiser alike.
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
    let mut state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: garbled trainer state: {e}", trainer_path.display()))?;
    if state.format < 3 && state.config.model.use_bias {
        // Before format 3, `use_bias` also meant biases on every MLP.
        state.config.model.mlp_bias = true;
    }
    let (weights, optimizer) = if state.shards.is_empty() {
        (
            read_tensors(&dir, MODEL_FILE, &state)?,
            read_tensors(&dir, OPTIMIZER_FILE, &state)?,
        )
    } else {
        read_shards(&dir, &state)?
    };
    Ok(Loaded {
        dir,
        state,
        weights,
        optimizer,
    })
}

/// Loads a trained run for inference on a plain device: its config, tokenizer and newest weights.
pub fn load_for_inference(
    run: &Path,
    device: &Device,
) -> Result<(LanguageModel, Tokenizer, RunConfig)> {
    let mut loaded = load_latest(run)?;
    loaded.bake_old_norm_head()?;
    let cfg = loaded.state.config.clone();
    let model = LanguageModel::uninitialised(&cfg.model, device);
    let what = loaded.dir.join(MODEL_FILE).display().to_string();
    let model = assign_weights(model, &loaded.weights, &what)?;
    let tokenizer = Tokenizer::load(run)?;
    Ok((model, tokenizer, cfg))
}

/// Averages the weights of a run's last `k` checkpoints (Ling 2.0's WSM schedule merges
/// checkpoints instead of decaying the learning rate): every parameter is the mean of its `k`
/// values, summed in f64. The result keeps the newest checkpoint's trainer state and has no
/// optimiser moments; [`save`] it into a new run (a fine-tune from it starts AdamW afresh).
pub fn merge_last(run: &Path, k: usize) -> Result<Loaded> {
    let all = list_checkpoints(run);
    if k == 0 {
        bail!("--last: must be at least 1");
    }
    if all.len() < k {
        bail!(
            "{}: has {} checkpoint(s), fewer than the {k} to merge (keep_checkpoints in run.toml \
             decides how many a run keeps)",
            run.display(),
            all.len()
        );
    }
    let mut sums: BTreeMap<String, (Vec<usize>, Vec<f64>)> = BTreeMap::new();
    let mut newest = None;
    for (step, dir) in &all[all.len() - k..] {
        let loaded = load_latest(dir)?;
        loaded.check_resumable()?;
        if !sums.is_empty() && sums.len() != loaded.weights.len() {
            bail!(
                "{}: step {step} holds other parameters than the others",
                dir.display()
            );
        }
        for (name, t) in &loaded.weights {
            let entry = sums
                .entry(name.clone())
                .or_insert_with(|| (t.shape.clone(), vec![0.0; t.data.len()]));
            if entry.0 != t.shape {
                bail!(
                    "{}: {name} changes shape between checkpoints",
                    dir.display()
                );
            }
            entry
                .1
                .iter_mut()
                .zip(&t.data)
                .for_each(|(s, &x)| *s += x as f64);
        }
        newest = Some(loaded);
    }
    let mut merged = newest.ok_or_else(|| anyhow!("{}: no checkpoint", run.display()))?;
    merged.weights = sums
        .into_iter()
        .map(|(name, (shape, sum))| {
            let data = sum.into_iter().map(|s| (s / k as f64) as f32).collect();
            (name, HostTensor { shape, data })
        })
        .collect();
    merged.optimizer.clear();
    Ok(merged)
}
