//! The cost planner: for a model and a number of training tokens, which mix of the
//! accelerators a user can get is cheapest (or fastest), whether it fits in memory, meets a
//! deadline, a budget and a domestic-chip share — and a check of those predictions against
//! measured nuwa runs.

pub mod calibration;
pub mod catalogue;
pub mod cost;
pub mod planfile;
pub mod report;
pub mod search;
pub mod verify;

pub use calibration::{Calibration, Point, DEFAULT_EFFICIENCY};
pub use catalogue::{Available, Catalogue, Device, Inventory};
pub use cost::{ExpertSplit, Layout, Workload};
pub use planfile::PlanFile;
pub use search::{Constraints, Objective, Plan};

use anyhow::{anyhow, Result};
use nuwa_core::parse_with_unit;

/// `1T`, `500B`, `2e12`: a count (tokens).
pub fn parse_count(s: &str) -> Result<f64> {
    let units = [("K", 1e3), ("M", 1e6), ("B", 1e9), ("G", 1e9), ("T", 1e12)];
    parse_with_unit(s, &units, "1T, 500B, 2e12")
}

/// `30d`, `12h`, `6w`: a duration in days.
pub fn parse_days(s: &str) -> Result<f64> {
    parse_with_unit(
        s,
        &[("d", 1.0), ("h", 1.0 / 24.0), ("w", 7.0)],
        "30d, 12h, 6w",
    )
}

/// The arithmetic behind Ant's published figure (Ling technical report: 1T tokens of Ling-Plus
/// for about ¥6.35M on device D at ¥27.5/h), and what the same efficiency predicts on the
/// report's other devices. Returns Markdown.
pub fn ant_example(catalogue: &Catalogue) -> Result<String> {
    let model = nuwa_model::ModelConfig::preset("ling-plus")?;
    let flops_per_token = model.counts(4096).train_flops_per_token;
    let tokens = 1e12;
    let d = catalogue
        .devices
        .get("D")
        .ok_or_else(|| anyhow!("the catalogue has no device D"))?;
    let (peak, price) = (
        d.bf16_tflops.unwrap_or(0.0) * 1e12,
        d.price_per_hour.unwrap_or(0.0),
    );
    let reported = 6.35e6;
    let device_hours = reported / price;
    let mfu = tokens * flops_per_token / (device_hours * 3600.0 * peak);
    let mut out = String::new();
    out.push_str("| quantity | value |\n|---|---:|\n");
    let rows = [
        (
            "Ling-Plus training FLOPs per token (6·active + attention, 4K context)",
            format!("{flops_per_token:.3e}"),
        ),
        (
            "FLOPs for 1T tokens",
            format!("{:.3e}", tokens * flops_per_token),
        ),
        ("reported cost on device D (CNY)", format!("{reported:.3e}")),
        ("device D price (CNY per device-hour)", format!("{price}")),
        (
            "implied device-hours (cost ÷ price)",
            format!("{device_hours:.0}"),
        ),
        ("device D peak (TFLOPS)", format!("{:.0}", peak / 1e12)),
        (
            "implied MFU (FLOPs ÷ (device-hours · 3600 · peak))",
            format!("{:.1}%", mfu * 100.0),
        ),
    ];
    for (k, v) in rows {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    out.push_str("\nAt that same MFU, 1T tokens on each of the report's devices:\n\n");
    out.push_str("| device | peak TFLOPS | CNY/h | device-hours | CNY per 1T tokens |\n|---|---:|---:|---:|---:|\n");
    for name in ["A", "B", "C", "D", "E"] {
        let Some(dev) = catalogue.devices.get(name) else {
            continue;
        };
        let (Some(t), Some(p)) = (dev.bf16_tflops, dev.price_per_hour) else {
            continue;
        };
        let hours = tokens * flops_per_token / (t * 1e12 * mfu * 3600.0);
        out.push_str(&format!(
            "| {name} | {t:.0} | {p} | {hours:.0} | {:.2}M |\n",
            hours * p / 1e6
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_durations_parse() {
        assert_eq!(parse_count("1T").unwrap(), 1e12);
        assert_eq!(parse_count("500B").unwrap(), 5e11);
        assert_eq!(parse_count("2e9").unwrap(), 2e9);
        assert!(parse_count("lots").is_err());
        assert_eq!(parse_days("2w").unwrap(), 14.0);
        assert_eq!(parse_days("12h").unwrap(), 0.5);
        assert!(parse_days("-3d").is_err());
    }
}
