//! Checkpoints of a model split across processes (expert or pipeline parallelism). Every rank
//! that owns parameters writes its own part — `model-rank-RRRRR.safetensors` and
//! `optimizer-rank-RRRRR.safetensors` — into one temporary folder, fsynced; rank 0 then writes
//! `trainer.json`, listing the parts ([`ShardRecord`]) with every file's checksum, and renames
//! the folder into place. Each stage of the save is agreed by every rank before the next, so a
//! failure anywhere (a full disk, a non-finite weight) fails the save everywhere and a save
//! interrupted anywhere leaves the last good checkpoint the newest.
//!
//! A shard may hold a tensor whole or a contiguous part of it (a rank's slice of a stacked
//! expert tensor, whose experts are the outermost dimension). Loading [`assemble`]s whole
//! tensors from the parts, so a sharded checkpoint loads on any layout and any number of
//! ranks — resharding is slicing what was assembled — and exports like any other.

use crate::checkpoint::{
    checkpoints_dir, prune, step_dir_name, TrainerState, CHECKPOINT_FORMAT, TRAINER_FILE,
};
use anyhow::{anyhow, bail, Context, Result};
use nuwa_core::comm::Collective;
use nuwa_core::{sha256_hex, write_synced};
use nuwa_model::weights::{to_safetensors, HostTensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Tensors = BTreeMap<String, HostTensor>;

/// Where a shard's part of a tensor lies in the whole tensor: the whole shape and the part's
/// first element (in row-major order); with `runs` `[stride, count]`, the part is `count`
/// equal runs, run `i` starting at `offset + i * stride` (a slice of every expert's columns),
/// else one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub shape: Vec<usize>,
    pub offset: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<[usize; 2]>,
}

/// One rank's files in a sharded checkpoint, as `trainer.json` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub rank: usize,
    pub model: String,
    pub optimizer: String,
    /// The tensors (weights or optimiser moments) the shard holds only a part of.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, Part>,
}

/// What one rank writes: its parameters and optimiser moments on the host, and where the
/// partial ones lie in their whole tensors.
#[derive(Debug, Default)]
pub struct Shard {
    pub weights: BTreeMap<String, HostTensor>,
    pub optimizer: BTreeMap<String, HostTensor>,
    pub parts: BTreeMap<String, Part>,
}

fn shard_files(rank: usize) -> (String, String, String) {
    (
        format!("model-rank-{rank:05}.safetensors"),
        format!("optimizer-rank-{rank:05}.safetensors"),
        format!("shard-rank-{rank:05}.json"),
    )
}

/// `result` if every rank of `comm` succeeded at `what`, else an error on every rank (the
/// failing rank's own, the others naming it). Collective.
fn agree<T>(comm: &dyn Collective, result: Result<T>, what: &str) -> Result<T> {
    let flags = comm.all_gather(&[if result.is_ok() { 1.0 } else { 0.0 }]);
    let value = result?;
    match flags.iter().position(|&f| f == 0.0) {
        Some(rank) => bail!("rank {rank} failed to {what}; this checkpoint is not written"),
        None => Ok(value),
    }
}

/// Writes rank's shard files into `dir` and its record (with checksums) beside them.
fn write_shard(dir: &Path, rank: usize, shard: &Shard, step: u64) -> Result<()> {
    if let Some((name, _)) = shard
        .weights
        .iter()
        .find(|(_, t)| t.data.iter().any(|x| !x.is_finite()))
    {
        bail!(
            "step {step}: parameter {name} is not finite; a checkpoint of it would poison the run"
        );
    }
    let (model, optimizer, record_file) = shard_files(rank);
    let model_bytes = to_safetensors(&shard.weights)?;
    let opt_bytes = to_safetensors(&shard.optimizer)?;
    write_synced(&dir.join(&model), &model_bytes)?;
    write_synced(&dir.join(&optimizer), &opt_bytes)?;
    let checksums = BTreeMap::from([
        (model.clone(), sha256_hex(&model_bytes)),
        (optimizer.clone(), sha256_hex(&opt_bytes)),
    ]);
    let record = ShardRecord {
        rank,
        model,
        optimizer,
        parts: shard.parts.clone(),
    };
    let text = serde_json::to_string(&(record, checksums))?;
    write_synced(&dir.join(record_file), text.as_bytes())
}

/// Rank 0's part: reads the writers' records, writes `trainer.json` and renames `tmp` to
/// `final_dir`.
fn commit(tmp: &Path, final_dir: &Path, writers: &[usize], mut state: TrainerState) -> Result<()> {
    state.format = CHECKPOINT_FORMAT;
    state.checksums.clear();
    state.shards.clear();
    for &rank in writers {
        let path = tmp.join(shard_files(rank).2);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let (record, checksums): (ShardRecord, BTreeMap<String, String>) =
            serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: garbled shard record: {e}", path.display()))?;
        state.checksums.extend(checksums);
        state.shards.push(record);
        std::fs::remove_file(&path)?;
    }
    write_synced(
        &tmp.join(TRAINER_FILE),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir)?;
    }
    std::fs::rename(tmp, final_dir)?;
    if let Some(root) = final_dir.parent() {
        if let Ok(d) = std::fs::File::open(root) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Saves a checkpoint of a model split across the ranks of `comm`: `mine` is this rank's
/// shard (`None`: it owns nothing another rank does not write); `state` is rank 0's. Prunes
/// old checkpoints beyond `keep`. Collective: every rank calls it; every rank returns the
/// same success or failure.
pub fn write_sharded(
    run: &Path,
    comm: &dyn Collective,
    mine: Option<Shard>,
    state: TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let (rank, step) = (comm.rank(), state.step);
    let root = checkpoints_dir(run);
    let final_dir = root.join(step_dir_name(step));
    // One folder for every rank: named by rank 0's process id.
    let owner = comm.all_gather(&[std::process::id() as f64])[0] as u64;
    let tmp = root.join(format!(".tmp-{}-{owner}", step_dir_name(step)));
    let fail = |e: anyhow::Error| {
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        e.context(format!("saving checkpoint {}", final_dir.display()))
    };
    let prepared = if rank == 0 {
        (|| -> Result<()> {
            std::fs::create_dir_all(&root)
                .with_context(|| format!("{}: cannot create", root.display()))?;
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)
                .with_context(|| format!("{}: cannot create", tmp.display()))
        })()
    } else {
        Ok(())
    };
    agree(comm, prepared, "prepare the checkpoint folder").map_err(fail)?;
    let written = match &mine {
        Some(shard) => write_shard(&tmp, rank, shard, step),
        None => Ok(()),
    };
    let writers: Vec<usize> = comm
        .all_gather(&[if mine.is_some() { 1.0 } else { 0.0 }])
        .iter()
        .enumerate()
        .filter(|(_, &w)| w > 0.0)
        .map(|(r, _)| r)
        .collect();
    agree(comm, written, "write its shard").map_err(fail)?;
    let committed = if rank == 0 {
        commit(&tmp, &final_dir, &writers, state)
    } else {
        Ok(())
    };
    agree(comm, committed, "commit the checkpoint").map_err(fail)?;
    if rank == 0 {
        prune(run, keep);
    }
    Ok(final_dir)
}

/// Whole tensors from shards' pieces: a tensor without a [`Part`] must be in one shard only;
/// the parts of one with them must tile it exactly. `pieces` are each shard's tensors with
/// its parts; `what` names the checkpoint in errors.
pub fn assemble(
    pieces: Vec<(Tensors, &BTreeMap<String, Part>)>,
    what: &str,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut whole: BTreeMap<String, HostTensor> = BTreeMap::new();
    let mut spans: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (tensors, parts) in pieces {
        for (name, t) in tensors {
            let Some(part) = parts.get(&name) else {
                if whole.insert(name.clone(), t).is_some() || spans.contains_key(&name) {
                    bail!("{what}: {name} is held by more than one shard");
                }
                continue;
            };
            let len: usize = part.shape.iter().product();
            let [stride, count] = part.runs.unwrap_or([0, 1]);
            let run = t.data.len() / count.max(1);
            if count == 0 || run * count != t.data.len() || (count > 1 && stride < run) {
                bail!(
                    "{what}: {name}: a part of {} values does not divide into {count} runs \
                     {stride} apart",
                    t.data.len()
                );
            }
            let end = part.offset + (count - 1) * stride + run;
            if end > len {
                bail!(
                    "{what}: {name}: a part ends at value {end}, past the {len} of its shape {:?}",
                    part.shape
                );
            }
            if whole.contains_key(&name) && !spans.contains_key(&name) {
                bail!("{what}: {name} is held whole by one shard and in part by another");
            }
            let entry = whole.entry(name.clone()).or_insert_with(|| HostTensor {
                shape: part.shape.clone(),
                data: vec![0.0; len],
            });
            if entry.shape != part.shape {
                bail!("{what}: {name}: its shards disagree on its shape");
            }
            let spans = spans.entry(name).or_default();
            for (i, values) in t.data.chunks(run.max(1)).enumerate() {
                let start = part.offset + i * stride;
                entry.data[start..start + run].copy_from_slice(values);
                spans.push((start, start + run));
            }
        }
    }
    for (name, mut ranges) in spans {
        ranges.sort_unstable();
        let len = whole.get(&name).map_or(0, |t| t.data.len());
        let mut at = 0;
        for (start, end) in ranges {
            if start != at {
                let problem = if start < at { "overlap" } else { "leave a gap" };
                let value = start.min(at);
                bail!("{what}: {name}: the shards' parts {problem} at value {value}");
            }
            at = end;
        }
        if at != len {
            bail!("{what}: {name}: the shards hold {at} of its {len} values (a shard is missing)");
        }
    }
    Ok(whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: &[f32]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    fn part(shape: &[usize], offset: usize) -> Part {
        Part {
            shape: shape.to_vec(),
            offset,
            runs: None,
        }
    }

    #[test]
    fn parts_assemble_into_whole_tensors() {
        let a_parts = BTreeMap::from([("e".to_string(), part(&[3, 2], 0))]);
        let b_parts = BTreeMap::from([("e".to_string(), part(&[3, 2], 2))]);
        let a = BTreeMap::from([
            ("e".to_string(), t(&[1, 2], &[1.0, 2.0])),
            ("w".to_string(), t(&[2], &[7.0, 8.0])),
        ]);
        let b = BTreeMap::from([("e".to_string(), t(&[2, 2], &[3.0, 4.0, 5.0, 6.0]))]);
        let whole = assemble(vec![(b, &b_parts), (a, &a_parts)], "ckpt").unwrap();
        assert_eq!(whole["e"], t(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        assert_eq!(whole["w"], t(&[2], &[7.0, 8.0]));
    }

    #[test]
    fn strided_parts_interleave_into_whole_tensors() {
        // A [2, 3] tensor split by columns: column 0 in one shard, columns 1..3 in the other.
        let strided = |offset, count| Part {
            runs: Some([3, count]),
            ..part(&[2, 3], offset)
        };
        let a_parts = BTreeMap::from([("e".to_string(), strided(0, 2))]);
        let b_parts = BTreeMap::from([("e".to_string(), strided(1, 2))]);
        let a = BTreeMap::from([("e".to_string(), t(&[2, 1], &[1.0, 4.0]))]);
        let b = BTreeMap::from([("e".to_string(), t(&[2, 2], &[2.0, 3.0, 5.0, 6.0]))]);
        let whole = assemble(vec![(a, &a_parts), (b.clone(), &b_parts)], "ckpt").unwrap();
        assert_eq!(whole["e"], t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let err = assemble(vec![(b, &b_parts)], "ckpt").unwrap_err();
        assert!(err.to_string().contains("leave a gap at value 0"), "{err}");
        let uneven = BTreeMap::from([("e".to_string(), t(&[3], &[1.0, 2.0, 3.0]))]);
        let err = assemble(vec![(uneven, &a_parts)], "ckpt").unwrap_err();
        assert!(err.to_string().contains("does not divide"), "{err}");
    }

    #[test]
    fn a_missing_overlapping_or_doubled_piece_is_refused() {
        let parts = BTreeMap::from([("e".to_string(), part(&[4], 0))]);
        let half = BTreeMap::from([("e".to_string(), t(&[2], &[1.0, 2.0]))]);
        let err = assemble(vec![(half.clone(), &parts)], "ckpt").unwrap_err();
        assert!(err.to_string().contains("hold 2 of its 4 values"), "{err}");
        let err = assemble(vec![(half.clone(), &parts), (half, &parts)], "ckpt").unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        let none = BTreeMap::new();
        let w = BTreeMap::from([("w".to_string(), t(&[1], &[1.0]))]);
        let err = assemble(vec![(w.clone(), &none), (w, &none)], "ckpt").unwrap_err();
        assert!(err.to_string().contains("more than one shard"), "{err}");
        let past = BTreeMap::from([("e".to_string(), part(&[4], 3))]);
        let two = BTreeMap::from([("e".to_string(), t(&[2], &[1.0, 2.0]))]);
        let err = assemble(vec![(two, &past)], "ckpt").unwrap_err();
        assert!(err.to_string().contains("past the 4"), "{err}");
    }
}
