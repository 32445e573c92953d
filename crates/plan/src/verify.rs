//! Checking the cost model against this machine: `nuwa plan calibrate` measures the
//! efficiency nuwa reaches on two benchmark shapes, `nuwa plan verify` predicts another
//! shape's step time from it and measures it. The timing itself is the trainer's
//! ([`StepTimer`]), so the planner does not link the trainer.

use crate::catalogue::Device;
use crate::cost::{self, Layout, Workload};
use crate::{Available, Calibration, Point};
use anyhow::{anyhow, Result};
use nuwa_model::ModelConfig;
use serde::Serialize;
use std::path::Path;

/// This machine's name in calibrations and catalogues.
pub const LOCAL_CPU: &str = "local-cpu";

/// The shapes `calibrate` measures: a small and a large step, bracketing the others.
pub const CALIBRATION_SHAPES: [&str; 2] = ["A", "B"];

/// A benchmark shape: the model and one step's batch.
pub struct BenchWorkload {
    pub model: ModelConfig,
    pub seq_len: usize,
    pub batch_size: usize,
}

/// Times training steps of named benchmark shapes (A, B, C, C-dense).
pub trait StepTimer {
    fn workload(&self, shape: &str) -> Result<BenchWorkload>;
    /// Per shape: (FLOPs per step, fastest step in seconds), the shapes timed in turn for
    /// `rounds` rounds after an untimed one, so slow drifts of a shared machine reach all
    /// alike. The fastest step: other work only ever slows a step down.
    fn fastest_steps(&self, shapes: &[&str], rounds: usize) -> Result<Vec<(f64, f64)>>;
}

/// This machine as a catalogue entry (peak from its CPU features, memory from the OS).
pub fn local_cpu() -> Device {
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map(|kib| kib * 1024.0 / 1e9);
    Device {
        name: LOCAL_CPU.into(),
        vendor: Some("this machine".into()),
        domestic: None,
        bf16_tflops: Some(nuwa_core::hardware::cpu_peak_flops() / 1e12),
        fp8_tflops: None,
        memory_gb: mem_gb,
        memory_bw_tbs: None,
        intra_node_gbs: None,
        inter_node_gbs: None,
        power_w: None,
        price_per_hour: None,
        currency: None,
        source: "measured here: cores × clock × FMA width (fp32), /proc/meminfo".into(),
    }
}

/// Replaces this machine's calibration points with the measured (FLOPs, seconds) steps of
/// [`CALIBRATION_SHAPES`]; returns a line per shape.
pub fn record_calibration(cal: &mut Calibration, steps: &[(f64, f64)]) -> Vec<String> {
    let peak = nuwa_core::hardware::cpu_peak_flops();
    cal.devices.remove(LOCAL_CPU);
    let mut lines = Vec::new();
    for (name, &(flops, seconds)) in CALIBRATION_SHAPES.iter().zip(steps) {
        let mfu = flops / seconds / peak;
        lines.push(format!(
            "shape {name}: {flops:.2e} FLOPs per step, fastest step {seconds:.3} s, MFU {:.1}%",
            mfu * 100.0
        ));
        let point = Point {
            flops_per_step: flops,
            mfu,
        };
        cal.add(LOCAL_CPU, point);
    }
    lines
}

/// The calibration at `path`, or an empty one if there is none yet.
pub fn load_or_new(path: &Path) -> Result<Calibration> {
    if path.exists() {
        Calibration::load(path)
    } else {
        Ok(Calibration::default())
    }
}

/// A shape's predicted and measured step time.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub shape: String,
    pub efficiency: f64,
    pub predicted_step_s: f64,
    pub measured_step_s: f64,
    pub relative_error: f64,
}

/// Predicts `shape`'s step time on this machine from `cal` and compares it with `measured`.
pub fn compare(
    cal: &Calibration,
    what: &str,
    w: &BenchWorkload,
    shape: &str,
    measured: f64,
) -> Result<Verification> {
    let workload = Workload {
        model: w.model.clone(),
        seq_len: w.seq_len,
        global_batch: w.batch_size,
        tokens: (w.batch_size * w.seq_len) as f64,
    };
    let step_flops = (w.batch_size * w.seq_len) as f64 * workload.flops_per_token();
    let eff = cal.efficiency(LOCAL_CPU, step_flops).ok_or_else(|| {
        anyhow!("{what}: no {LOCAL_CPU} measurements; run `nuwa plan calibrate` first")
    })?;
    let cpu = local_cpu();
    let available = Available {
        name: LOCAL_CPU.into(),
        count: 1,
        peak_flops: cpu.bf16_tflops.unwrap_or(0.0) * 1e12,
        memory_bytes: cpu.memory_gb.unwrap_or(0.0) * 1e9,
        price_per_hour: 0.0,
        domestic: false,
        intra_node_bytes_s: 1e11,
        inter_node_bytes_s: 1e11,
        per_node: 1,
        assumed: vec![],
    };
    let layout = Layout {
        micro_batch: w.batch_size,
        ..Layout::default()
    };
    let predicted =
        cost::step_time(&workload, &available, &layout, eff, w.batch_size, 1, 1e11).total;
    Ok(Verification {
        shape: shape.to_string(),
        efficiency: eff,
        predicted_step_s: predicted,
        measured_step_s: measured,
        relative_error: (predicted - measured) / measured,
    })
}

/// Measures `shape` and checks the prediction from the calibration at `path`. With
/// `calibrate`, the calibration shapes are timed in the same run, in turn with `shape`, and
/// saved to `path` first (their lines are returned beside the verification).
pub fn verify(
    timer: &dyn StepTimer,
    shape: &str,
    path: &Path,
    calibrate: bool,
    rounds: usize,
) -> Result<(Verification, Vec<String>)> {
    let w = timer.workload(shape)?;
    let (cal, measured, lines) = if calibrate {
        let mut names = CALIBRATION_SHAPES.to_vec();
        names.push(shape);
        let steps = timer.fastest_steps(&names, rounds.max(1))?;
        let mut cal = load_or_new(path)?;
        let lines = record_calibration(&mut cal, &steps);
        cal.save(path)?;
        (cal, steps[CALIBRATION_SHAPES.len()].1, lines)
    } else {
        let cal = Calibration::load(path)?;
        let measured = timer.fastest_steps(&[shape], rounds.max(1))?[0].1;
        (cal, measured, Vec::new())
    };
    let v = compare(&cal, &path.display().to_string(), &w, shape, measured)?;
    Ok((v, lines))
}
