//! The plan file: what `nuwa plan --out plan.toml` chose and `nuwa train --plan plan.toml` (or
//! `nuwa launch --plan`) runs — the model, the batch, the parallel layout, which device each
//! rank is, and what the planner predicted, so the run can be compared with it.
//!
//! ```toml
//! model = "ling-lite"
//! seq_len = 4096
//! global_batch = 1024          # sequences per optimiser step
//!
//! [layout]
//! tp = 1                       # tensor parallelism: not implemented, must be 1
//! pp = 2                       # pipeline stages
//! ep = 4                       # ranks per expert-parallel group
//! dp = 8                       # pipeline replicas (ranks = pp × dp)
//! micro_batch = 2              # sequences per micro-batch per replica
//! recompute = false            # activation recomputation: not implemented, must be false
//! stage_layers = [15, 13]      # optional: decoder layers per stage (else measured)
//! expert_placement = [16, 16, 16, 16]  # optional: experts per EP member (else measured)
//! expert_split = "experts"     # with ep > 1: whole experts per rank, or "width" (a share
//!                              # of every expert's columns; the planner's choice for groups
//!                              # mixing kinds of device)
//!
//! [[part]]                     # ranks in order: part after part
//! device = "H800"
//! count = 16
//!
//! [predicted]
//! step_seconds = 3.2
//! memory_bytes = [6.1e10]      # per device of each part
//! ```

use crate::cost::{ExpertSplit, Layout};
use crate::search::Plan;
use anyhow::{anyhow, bail, Context, Result};
use nuwa_model::ModelConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    /// A preset name or a model config file.
    pub model: String,
    pub seq_len: usize,
    pub global_batch: usize,
    pub layout: LayoutFile,
    #[serde(rename = "part")]
    pub parts: Vec<PartFile>,
    #[serde(default)]
    pub predicted: Option<Predicted>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayoutFile {
    #[serde(default = "one")]
    pub tp: usize,
    #[serde(default = "one")]
    pub pp: usize,
    #[serde(default = "one")]
    pub ep: usize,
    pub dp: usize,
    #[serde(default = "one")]
    pub micro_batch: usize,
    #[serde(default)]
    pub recompute: bool,
    #[serde(default)]
    pub stage_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub expert_placement: Option<Vec<usize>>,
    /// How each expert group splits the routed experts (`--ep-split`); absent: by experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_split: Option<ExpertSplit>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartFile {
    pub device: String,
    pub count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Predicted {
    pub step_seconds: f64,
    /// Bytes per device of each part.
    pub memory_bytes: Vec<f64>,
    /// Where the devices' efficiency came from (calibrated, given, or the default): what the
    /// prediction is worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efficiency: Option<String>,
}

impl PlanFile {
    /// The file for `plan` (of `model`, with the batch it was searched for).
    pub fn of(plan: &Plan, model: &str, seq_len: usize, global_batch: usize) -> Self {
        let l: &Layout = &plan.layout;
        Self {
            model: model.to_string(),
            seq_len,
            global_batch,
            layout: LayoutFile {
                tp: l.tp,
                pp: l.pp,
                ep: l.ep,
                dp: plan.parts.iter().map(|p| p.replicas).sum(),
                micro_batch: l.micro_batch,
                recompute: false,
                stage_layers: None,
                expert_placement: None,
                expert_split: (l.ep > 1).then_some(l.expert_split),
            },
            parts: plan
                .parts
                .iter()
                .map(|p| PartFile {
                    device: p.device.clone(),
                    count: p.count,
                })
                .collect(),
            predicted: Some(Predicted {
                step_seconds: plan.step_seconds,
                memory_bytes: plan.parts.iter().map(|p| p.memory.total).collect(),
                efficiency: None,
            }),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the plan", path.display()))?;
        let plan: Self = toml::from_str(&text).map_err(|e| {
            let msg = e.message().to_string();
            anyhow!("{}: {msg}", path.display())
        })?;
        plan.check_shape()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(plan)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# written by `nuwa plan`; run it with `nuwa launch --plan {}  -- ...`\n{}",
            path.display(),
            toml::to_string_pretty(self)?
        );
        nuwa_core::atomic_write(path, text.as_bytes())
    }

    /// Ranks the plan runs on.
    pub fn ranks(&self) -> usize {
        self.parts.iter().map(|p| p.count).sum()
    }

    /// Sequences in one micro-batch of every replica together (`nuwa train --batch-size`).
    pub fn batch_size(&self) -> usize {
        self.layout.micro_batch * self.layout.dp
    }

    /// Micro-batches per optimiser step (`nuwa train --grad-accum`).
    pub fn grad_accum(&self) -> usize {
        self.global_batch / self.batch_size().max(1)
    }

    /// The file's own consistency, before any model is known.
    fn check_shape(&self) -> Result<()> {
        let l = &self.layout;
        if l.tp != 1 {
            bail!(
                "layout.tp = {}: tensor parallelism is not implemented yet (plans use tp = 1)",
                l.tp
            );
        }
        if l.recompute {
            bail!(
                "layout.recompute = true: activation recomputation is not implemented yet \
                 (plans use recompute = false)"
            );
        }
        for (name, v) in [
            ("pp", l.pp),
            ("ep", l.ep),
            ("dp", l.dp),
            ("micro_batch", l.micro_batch),
        ] {
            if v == 0 {
                bail!("layout.{name} must be at least 1");
            }
        }
        if self.parts.is_empty() || self.parts.iter().any(|p| p.count == 0) {
            bail!("[[part]]: at least one part, each with count >= 1");
        }
        let ranks = self.ranks();
        if ranks != l.pp * l.dp {
            bail!(
                "layout: pp {} × dp {} = {} ranks, but the parts list {ranks} devices",
                l.pp,
                l.dp,
                l.pp * l.dp
            );
        }
        if !l.dp.is_multiple_of(l.ep) {
            bail!("layout.ep = {}: does not divide dp = {} (each stage's ranks form whole expert groups)", l.ep, l.dp);
        }
        let batch = self.batch_size();
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(batch) {
            bail!(
                "global_batch = {}: must be a multiple of micro_batch × dp = {batch}",
                self.global_batch
            );
        }
        if let Some(stages) = &l.stage_layers {
            if stages.len() != l.pp || stages.contains(&0) {
                bail!(
                    "layout.stage_layers: needs {} counts of at least 1 (one per stage)",
                    l.pp
                );
            }
        }
        if let Some(p) = &l.expert_placement {
            if p.len() != l.ep || p.contains(&0) {
                bail!(
                    "layout.expert_placement: needs {} counts of at least 1 (one per EP member)",
                    l.ep
                );
            }
        }
        match l.expert_split {
            Some(split) if l.ep == 1 => bail!(
                "layout.expert_split = \"{split}\": nothing to split with ep = 1 (leave it out)"
            ),
            Some(ExpertSplit::Width) if l.expert_placement.is_some() => bail!(
                "layout.expert_split = \"width\": every rank holds a share of every expert, but \
                 layout.expert_placement counts whole experts per rank; drop one of the two"
            ),
            Some(ExpertSplit::Shared) if l.expert_placement.is_some() => bail!(
                "layout.expert_split = \"shared\": neighbouring ranks share experts, but \
                 layout.expert_placement counts experts per rank with none shared; drop one of \
                 the two"
            ),
            _ => {}
        }
        Ok(())
    }

    /// Whether the plan's layout fits `model`, naming the field that does not.
    pub fn check_model(&self, model: &ModelConfig) -> Result<()> {
        let l = &self.layout;
        let layers = model.num_hidden_layers;
        if l.pp > layers {
            bail!(
                "layout.pp = {}: the model has only {layers} decoder layers",
                l.pp
            );
        }
        if let Some(stages) = &l.stage_layers {
            let sum: usize = stages.iter().sum();
            if sum != layers {
                bail!(
                    "layout.stage_layers {stages:?}: sums to {sum}, the model has {layers} layers"
                );
            }
        }
        if l.ep > 1 && !model.is_moe() {
            bail!(
                "layout.ep = {}: the model is dense (expert parallelism needs routed experts)",
                l.ep
            );
        }
        if l.ep > model.num_experts.max(1) {
            bail!(
                "layout.ep = {}: more ranks per expert group than the model's {} routed experts",
                l.ep,
                model.num_experts
            );
        }
        if let Some(p) = &l.expert_placement {
            let sum: usize = p.iter().sum();
            if sum != model.num_experts {
                bail!(
                    "layout.expert_placement {p:?}: places {sum} experts, the model has {}",
                    model.num_experts
                );
            }
        }
        if l.pp > 1 && model.tie_word_embeddings {
            bail!(
                "layout.pp = {}: the model ties its embeddings, which a pipeline does not support",
                l.pp
            );
        }
        Ok(())
    }

    /// Whether a job of `ranks` processes can run the plan.
    pub fn check_ranks(&self, ranks: usize) -> Result<()> {
        let want = self.ranks();
        if ranks != want {
            bail!("the plan is for {want} rank(s) (its [[part]] counts), but this job has {ranks}");
        }
        Ok(())
    }

    /// The device of world rank `rank` (parts in order).
    pub fn device_of(&self, rank: usize) -> &str {
        let mut end = 0;
        for p in &self.parts {
            end += p.count;
            if rank < end {
                return &p.device;
            }
        }
        self.parts.last().map_or("cpu", |p| p.device.as_str())
    }
}

/// The Burn backend a catalogue device trains on, from its vendor: `None` for devices no
/// backend of nuwa drives yet (Ascend, Kunlun, Cambricon, ...).
pub fn backend_of(device: &str, vendor: Option<&str>) -> Option<&'static str> {
    if device == crate::verify::LOCAL_CPU || device == "cpu" {
        return Some("cpu");
    }
    match vendor.map(str::to_ascii_lowercase).as_deref() {
        Some(v) if v.contains("nvidia") => Some("cuda"),
        Some(v) if v.contains("amd") => Some("rocm"),
        Some(v) if v.contains("apple") => Some("metal"),
        _ => None,
    }
}

/// What the cost model predicts for `plan` (its model being `model`): the step time (each
/// part's devices at the efficiency `efficiency` gives for a step's FLOPs, the slowest part
/// setting the pace) and the memory per device of each part.
pub fn predict(
    plan: &PlanFile,
    model: &ModelConfig,
    catalogue: &crate::Catalogue,
    efficiency: &dyn Fn(&str, f64) -> f64,
) -> Result<Predicted> {
    use crate::catalogue::{Inventory, InventoryEntry};
    let inventory = Inventory {
        currency: "-".into(),
        device: plan
            .parts
            .iter()
            .map(|p| InventoryEntry {
                name: p.device.clone(),
                count: p.count,
                price_per_hour: Some(0.0),
                bf16_tflops: None,
                memory_gb: None,
                domestic: None,
                inter_node_gbs: None,
                per_node: None,
            })
            .collect(),
    };
    let devices = inventory.resolve(catalogue, "plan")?;
    let w = crate::Workload {
        model: model.clone(),
        seq_len: plan.seq_len,
        global_batch: plan.global_batch,
        tokens: (plan.global_batch * plan.seq_len) as f64,
    };
    let l = &plan.layout;
    let layout = Layout {
        tp: 1,
        pp: l.pp,
        ep: l.ep,
        micro_batch: l.micro_batch,
        expert_split: l.expert_split.unwrap_or_default(),
    };
    let dp_bw = devices
        .iter()
        .map(|d| d.inter_node_bytes_s.min(d.intra_node_bytes_s))
        .fold(f64::INFINITY, f64::min);
    let per_replica = plan.global_batch / l.dp.max(1);
    let mut step_seconds: f64 = 0.0;
    let mut memory_bytes = Vec::new();
    for d in &devices {
        // A replica's step: its share of the batch over its pp devices.
        let flops = (per_replica * plan.seq_len) as f64 * w.flops_per_token() / l.pp as f64;
        let eff = efficiency(&d.name, flops);
        let t = crate::cost::step_time(&w, d, &layout, eff, per_replica, l.dp, dp_bw);
        step_seconds = step_seconds.max(t.total);
        memory_bytes.push(crate::cost::memory(&w, d, &layout, l.dp).total);
    }
    Ok(Predicted {
        step_seconds,
        memory_bytes,
        efficiency: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PlanFile {
        toml::from_str(
            "model = \"tiny-moe\"\nseq_len = 16\nglobal_batch = 8\n[layout]\npp = 2\nep = 2\ndp = 2\nmicro_batch = 2\n[[part]]\ndevice = \"local-cpu\"\ncount = 4\n",
        )
        .unwrap()
    }

    #[test]
    fn a_plan_maps_to_the_trainer_and_checks_itself() {
        let p = plan();
        p.check_shape().unwrap();
        assert_eq!((p.ranks(), p.batch_size(), p.grad_accum()), (4, 4, 2));
        assert!(p
            .check_ranks(6)
            .unwrap_err()
            .to_string()
            .contains("is for 4 rank(s)"));
        let mut bad = p.clone();
        bad.layout.tp = 4;
        assert!(bad
            .check_shape()
            .unwrap_err()
            .to_string()
            .contains("layout.tp = 4"));
        let mut bad = p.clone();
        bad.layout.recompute = true;
        assert!(bad
            .check_shape()
            .unwrap_err()
            .to_string()
            .contains("layout.recompute = true"));
        let mut bad = p.clone();
        bad.layout.ep = 3;
        assert!(bad
            .check_shape()
            .unwrap_err()
            .to_string()
            .contains("layout.ep = 3"));
        let mut bad = p.clone();
        bad.global_batch = 6;
        assert!(bad
            .check_shape()
            .unwrap_err()
            .to_string()
            .contains("global_batch = 6"));
        assert!(toml::from_str::<PlanFile>("model = \"x\"\nsurprise = 1\n").is_err());
        assert_eq!(backend_of("H800", Some("NVIDIA")), Some("cuda"));
        assert_eq!(backend_of("Ascend 910B", Some("Huawei")), None);
    }

    #[test]
    fn the_expert_split_is_read_and_checked() {
        let with = |line: &str| {
            let text = toml::to_string(&plan())
                .unwrap()
                .replace("[layout]\n", &format!("[layout]\n{line}\n"));
            toml::from_str::<PlanFile>(&text)
        };
        let width = with("expert_split = \"width\"").unwrap();
        width.check_shape().unwrap();
        assert_eq!(width.layout.expert_split, Some(ExpertSplit::Width));
        assert_eq!(plan().layout.expert_split, None, "absent: by experts");
        let err = with("expert_split = \"rows\"").unwrap_err().to_string();
        assert!(err.contains("unknown variant `rows`"), "{err}");
        let mut bad = width.clone();
        bad.layout.expert_placement = Some(vec![5, 3]);
        let err = bad.check_shape().unwrap_err().to_string();
        assert!(
            err.contains("layout.expert_split = \"width\"") && err.contains("expert_placement"),
            "{err}"
        );
        let mut bad = width.clone();
        bad.layout.ep = 1;
        let err = bad.check_shape().unwrap_err().to_string();
        assert!(err.contains("nothing to split with ep = 1"), "{err}");
        // Written back, the split survives; a plan without expert parallelism writes none.
        let again: PlanFile = toml::from_str(&toml::to_string(&width).unwrap()).unwrap();
        assert_eq!(again, width);
    }
}
