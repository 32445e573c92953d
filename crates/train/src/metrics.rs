//! Run metrics: one JSON object per line in `RUN/metrics.jsonl`, and the loss curve as SVG.

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::io::Write;
use std::path::Path;

pub struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `metrics.jsonl` for appending (a resumed run continues the same file).
    pub fn open(run: &Path) -> Result<Self> {
        let path = run.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}")?;
        Ok(())
    }
}

/// Reads `(step, train loss)` and `(step, val loss)` series from a run's metrics, keeping only
/// the last record of each step (a resumed run may repeat steps).
/// `(step, loss)` points of one curve.
pub type Series = Vec<(f64, f64)>;

pub fn read_losses(run: &Path) -> (Series, Series) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let mut train = std::collections::BTreeMap::new();
    let mut val = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(Value::as_u64) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(Value::as_f64) {
            train.insert(step, l);
        }
        if let Some(l) = v.get("val_loss").and_then(Value::as_f64) {
            val.insert(step, l);
        }
    }
    let to_vec = |m: std::collections::BTreeMap<u64, f64>| {
        m.into_iter().map(|(s, l)| (s as f64, l)).collect()
    };
    (to_vec(train), to_vec(val))
}

/// Draws training and validation loss against step into `RUN/loss.svg`.
pub fn plot_losses(run: &Path) -> Result<std::path::PathBuf> {
    let (train, val) = read_losses(run);
    let path = run.join("loss.svg");
    if train.is_empty() {
        return Ok(path);
    }
    let max_step = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    nuwa_core::plot::svg(&path, (800, 480), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("nuwa training loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
        }
        nuwa_core::plot::legend(&mut chart)
    })?;
    Ok(path)
}
