//! The accelerator catalogue and the user's inventory (what they can rent or buy, how many,
//! at what price).

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One kind of accelerator. `None` is an unknown figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub name: String,
    #[serde(default)]
    pub vendor: Option<String>,
    #[serde(default)]
    pub domestic: Option<bool>,
    /// Dense peak BF16/FP16 TFLOPS.
    #[serde(default)]
    pub bf16_tflops: Option<f64>,
    #[serde(default)]
    pub fp8_tflops: Option<f64>,
    #[serde(default)]
    pub memory_gb: Option<f64>,
    #[serde(default)]
    pub memory_bw_tbs: Option<f64>,
    /// Per-device bandwidth to peers in the same node (NVLink and the like), GB/s.
    #[serde(default)]
    pub intra_node_gbs: Option<f64>,
    /// Per-device network bandwidth to other nodes, GB/s.
    #[serde(default)]
    pub inter_node_gbs: Option<f64>,
    #[serde(default)]
    pub power_w: Option<f64>,
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub source: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    device: Vec<Device>,
}

pub const BUILTIN: &str = include_str!("../catalogue.toml");

#[derive(Debug, Clone)]
pub struct Catalogue {
    pub devices: BTreeMap<String, Device>,
}

impl Catalogue {
    /// The built-in catalogue, plus the local CPU, plus (overriding by name) a user file.
    pub fn load(extra: Option<&Path>, local_cpu: Device) -> Result<Self> {
        let builtin: CatalogueFile =
            toml::from_str(BUILTIN).map_err(|e| anyhow!("built-in catalogue: {e}"))?;
        let mut devices: BTreeMap<String, Device> = builtin
            .device
            .into_iter()
            .map(|d| (d.name.clone(), d))
            .collect();
        devices.insert(local_cpu.name.clone(), local_cpu);
        if let Some(path) = extra {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let file: CatalogueFile =
                toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            for d in file.device {
                devices.insert(d.name.clone(), d);
            }
        }
        Ok(Self { devices })
    }
}

/// What the user can get: device kinds, how many, and prices that override the catalogue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The currency every price is in.
    pub currency: String,
    #[serde(default)]
    pub device: Vec<InventoryEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryEntry {
    pub name: String,
    /// Most devices of this kind available.
    pub count: usize,
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    #[serde(default)]
    pub bf16_tflops: Option<f64>,
    #[serde(default)]
    pub memory_gb: Option<f64>,
    #[serde(default)]
    pub domestic: Option<bool>,
    #[serde(default)]
    pub inter_node_gbs: Option<f64>,
    /// Devices per node (NVLink domain); default 8.
    #[serde(default)]
    pub per_node: Option<usize>,
}

/// A device kind ready to plan with: every figure the cost model needs is known.
#[derive(Debug, Clone, Serialize)]
pub struct Available {
    pub name: String,
    pub count: usize,
    pub peak_flops: f64,
    pub memory_bytes: f64,
    pub price_per_hour: f64,
    pub domestic: bool,
    pub intra_node_bytes_s: f64,
    pub inter_node_bytes_s: f64,
    pub per_node: usize,
    /// Figures the planner assumed because neither catalogue nor inventory gave them.
    pub assumed: Vec<String>,
}

/// Default links where nothing is known: 50 GB/s per device between nodes (a 400 Gb/s NIC),
/// 100 GB/s within a node (PCIe 5 class).
pub const DEFAULT_INTER_NODE_GBS: f64 = 50.0;
pub const DEFAULT_INTRA_NODE_GBS: f64 = 100.0;

impl Inventory {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let inv: Self = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if inv.device.is_empty() {
            bail!("{}: no [[device]] entries", path.display());
        }
        Ok(inv)
    }

    /// Joins the inventory with the catalogue; every problem (unknown names, missing figures,
    /// a price in another currency, duplicates) is reported together.
    pub fn resolve(&self, catalogue: &Catalogue, what: &str) -> Result<Vec<Available>> {
        let mut problems = Vec::new();
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for e in &self.device {
            if !seen.insert(e.name.clone()) {
                problems.push(format!("`{}` is listed twice", e.name));
                continue;
            }
            let Some(d) = catalogue.devices.get(&e.name) else {
                let known: Vec<&str> = catalogue.devices.keys().map(String::as_str).collect();
                problems.push(format!(
                    "unknown device `{}` (known: {}; or add it with --catalogue)",
                    e.name,
                    known.join(", ")
                ));
                continue;
            };
            if e.count == 0 {
                problems.push(format!("`{}`: count must be positive", e.name));
            }
            let price = match (e.price_per_hour, d.price_per_hour) {
                (Some(p), _) => Some(p),
                (None, Some(p)) => {
                    let cur = d.currency.clone().unwrap_or_default();
                    if cur != self.currency {
                        problems.push(format!(
                            "`{}`: the catalogue price is in {cur}, the inventory in {}; give \
                             price_per_hour in {} in the inventory",
                            e.name, self.currency, self.currency
                        ));
                    }
                    Some(p)
                }
                (None, None) => {
                    problems.push(format!(
                        "`{}`: price unknown; give price_per_hour in the inventory",
                        e.name
                    ));
                    None
                }
            };
            let tflops = e.bf16_tflops.or(d.bf16_tflops);
            let memory = e.memory_gb.or(d.memory_gb);
            if tflops.is_none() {
                problems.push(format!(
                    "`{}`: peak BF16 TFLOPS unknown; give bf16_tflops in the inventory",
                    e.name
                ));
            }
            if memory.is_none() {
                problems.push(format!(
                    "`{}`: memory unknown; give memory_gb in the inventory",
                    e.name
                ));
            }
            let mut assumed = Vec::new();
            let domestic = e.domestic.or(d.domestic).unwrap_or_else(|| {
                assumed.push("not domestic (unknown)".to_string());
                false
            });
            let inter = e.inter_node_gbs.or(d.inter_node_gbs).unwrap_or_else(|| {
                assumed.push(format!("{DEFAULT_INTER_NODE_GBS} GB/s between nodes"));
                DEFAULT_INTER_NODE_GBS
            });
            let intra = d.intra_node_gbs.unwrap_or_else(|| {
                assumed.push(format!("{DEFAULT_INTRA_NODE_GBS} GB/s within a node"));
                DEFAULT_INTRA_NODE_GBS
            });
            if let (Some(p), Some(t), Some(m)) = (price, tflops, memory) {
                if p < 0.0 || t <= 0.0 || m <= 0.0 {
                    problems.push(format!(
                        "`{}`: price, TFLOPS and memory must be positive",
                        e.name
                    ));
                }
                out.push(Available {
                    name: e.name.clone(),
                    count: e.count,
                    peak_flops: t * 1e12,
                    memory_bytes: m * 1e9,
                    price_per_hour: p,
                    domestic,
                    intra_node_bytes_s: intra * 1e9,
                    inter_node_bytes_s: inter * 1e9,
                    per_node: e.per_node.unwrap_or(8).max(1),
                    assumed,
                });
            }
        }
        if !problems.is_empty() {
            bail!(
                "{what}: {} problem(s): {}",
                problems.len(),
                problems.join("; ")
            );
        }
        Ok(out)
    }
}
