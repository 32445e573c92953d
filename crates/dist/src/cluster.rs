//! The cluster file: which device (and backend) each rank uses, and what bounds it.
//!
//! ```toml
//! [[rank]]            # rank 0
//! device = "cuda:0"
//! [[rank]]            # rank 1
//! device = "rocm:0"
//! max_seqs = 4        # most sequences per micro-batch this device's memory holds
//! memory_gb = 24      # memory for the model's parameters, gradients and optimiser state
//!                     # (default: the host's available memory), which bounds its experts
//!                     # and pipeline layers
//! [[rank]]            # rank 2 (and any further ranks reuse the last entry)
//! device = "cpu"
//! ```

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RankSpec {
    #[serde(default = "cpu")]
    pub device: String,
    #[serde(default)]
    pub max_seqs: Option<usize>,
    /// GB of memory this rank may fill with parameters, their gradients and optimiser state
    /// (default: the host's available memory): it bounds the experts (or expert columns)
    /// and the pipeline layers the rank is given.
    #[serde(default)]
    pub memory_gb: Option<f64>,
    /// Test-only slowdown factor (see `--throttle`).
    #[serde(default)]
    pub throttle: Option<f64>,
}

fn cpu() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(default)]
    pub rank: Vec<RankSpec>,
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let file: Self = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if file.rank.is_empty() {
            bail!("{}: no [[rank]] entries", path.display());
        }
        for (i, r) in file.rank.iter().enumerate() {
            if r.max_seqs == Some(0) {
                bail!("{}: rank {i}: max_seqs must be positive", path.display());
            }
            if r.memory_gb.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
                bail!(
                    "{}: rank {i}: memory_gb must be a positive number",
                    path.display()
                );
            }
            if r.throttle.is_some_and(|t| !(t >= 1.0 && t.is_finite())) {
                bail!(
                    "{}: rank {i}: throttle must be a number >= 1",
                    path.display()
                );
            }
        }
        Ok(file)
    }

    /// The entry for `rank` (ranks beyond the list reuse its last entry).
    pub fn spec(&self, rank: usize) -> RankSpec {
        self.rank
            .get(rank)
            .or(self.rank.last())
            .cloned()
            .unwrap_or_default()
    }
}

/// `--throttle 1,2.5`: one slowdown factor per rank (missing ranks run at full speed).
pub fn parse_throttles(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|p| {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| anyhow!("--throttle {s}: `{p}` is not a number"))?;
            if !(1.0..=1000.0).contains(&v) {
                bail!(
                    "--throttle {s}: factors must be in [1, 1000] (a rank that many times slower)"
                );
            }
            Ok(v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_and_specs() {
        assert_eq!(parse_throttles("1, 2").unwrap(), [1.0, 2.0]);
        assert!(parse_throttles("0.5").is_err());
        assert!(parse_throttles("1e300").is_err());
        let f: ClusterFile =
            toml::from_str("[[rank]]\ndevice = \"cpu\"\n[[rank]]\nmax_seqs = 3\n").unwrap();
        assert_eq!(f.spec(1).max_seqs, Some(3));
        assert_eq!(f.spec(5).device, "cpu");
        assert!(toml::from_str::<ClusterFile>("[[rank]]\ngpu = 1\n").is_err());
    }
}
