//! Achieved efficiency (model-FLOPs utilisation) per device, measured by `nuwa plan
//! calibrate` with short nuwa training runs; the cost model's compute time uses it.

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Efficiency assumed for a device nobody has calibrated: a typical large-model training MFU.
pub const DEFAULT_EFFICIENCY: f64 = 0.40;

/// One measurement: FLOPs in a training step and the MFU reached.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub flops_per_step: f64,
    pub mfu: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Device name → measurements, by increasing FLOPs per step.
    pub devices: BTreeMap<String, Vec<Point>>,
}

impl Calibration {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: garbled calibration: {e}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
    }

    pub fn add(&mut self, device: &str, point: Point) {
        let points = self.devices.entry(device.to_string()).or_default();
        points.push(point);
        points.sort_by(|a, b| a.flops_per_step.total_cmp(&b.flops_per_step));
    }

    /// The device's efficiency at a step of `flops_per_step`: interpolated in log-FLOPs
    /// between measurements, the nearest one outside them; `None` if never calibrated.
    pub fn efficiency(&self, device: &str, flops_per_step: f64) -> Option<f64> {
        let pts = self.devices.get(device).filter(|p| !p.is_empty())?;
        let x = flops_per_step.max(1.0).ln();
        let first = pts.first()?;
        let last = pts.last()?;
        if x <= first.flops_per_step.ln() {
            return Some(first.mfu);
        }
        if x >= last.flops_per_step.ln() {
            return Some(last.mfu);
        }
        pts.windows(2).find_map(|w| {
            let (x0, x1) = (w[0].flops_per_step.ln(), w[1].flops_per_step.ln());
            (x >= x0 && x <= x1).then(|| w[0].mfu + (w[1].mfu - w[0].mfu) * (x - x0) / (x1 - x0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_in_log_flops() {
        let mut c = Calibration::default();
        c.add(
            "cpu",
            Point {
                flops_per_step: 1e12,
                mfu: 0.3,
            },
        );
        c.add(
            "cpu",
            Point {
                flops_per_step: 1e10,
                mfu: 0.1,
            },
        );
        assert_eq!(c.efficiency("cpu", 1e9), Some(0.1));
        assert!((c.efficiency("cpu", 1e11).unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(c.efficiency("gpu", 1e11), None);
    }
}
