//! A parity report as people read it (Markdown, and an SVG of the loss difference per step)
//! and as programs read it (JSON).

use crate::compare::PairReport;
use crate::dump::Kind;
use anyhow::Result;
use plotters::prelude::*;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Speed and loss of one device's run.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSummary {
    pub name: String,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub final_loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was run (model, batch, steps), in words.
    pub recipe: String,
    pub devices: Vec<DeviceSummary>,
    /// Each device against the first.
    pub pairs: Vec<PairReport>,
    /// `--deterministic`: each device run twice, against itself.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub determinism: Vec<Determinism>,
}

/// Whether a device computes bit for bit the same when it runs the same recipe again.
#[derive(Debug, Clone, Serialize)]
pub struct Determinism {
    pub device: String,
    /// Elements of the recorded step that differ between the two runs.
    pub differing: usize,
    pub elements: usize,
    /// Whether every step's loss repeated exactly.
    pub losses_equal: bool,
}

impl Determinism {
    pub fn bit_exact(&self) -> bool {
        self.differing == 0 && self.losses_equal
    }
}

impl Report {
    pub fn ok(&self) -> bool {
        self.pairs.iter().all(|p| p.ok)
    }

    pub fn verdicts(&self) -> Vec<String> {
        self.pairs.iter().map(verdict).collect()
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        nuwa_core::files::atomic_write(
            &dir.join("parity.json"),
            &serde_json::to_vec_pretty(self)?,
        )?;
        nuwa_core::files::atomic_write(&dir.join("parity.md"), self.markdown().as_bytes())?;
        if self.pairs.iter().any(|p| p.loss_a.len() > 1) {
            plot_loss_difference(&self.pairs, &dir.join("loss-difference.svg"))?;
        }
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Parity report\n\n{}\n", self.recipe);
        if !self.devices.is_empty() {
            let _ = writeln!(
                s,
                "| device | seconds | tokens/s | final loss |\n|---|---:|---:|---:|"
            );
            for d in &self.devices {
                let _ = writeln!(
                    s,
                    "| {} | {:.1} | {:.0} | {:.6} |",
                    d.name, d.seconds, d.tokens_per_s, d.final_loss
                );
            }
            s.push('\n');
        }
        if !self.determinism.is_empty() {
            let _ = writeln!(
                s,
                "## Run to run (`--deterministic`)\n\n| device | bit-exact | elements differing | losses equal |\n|---|---|---:|---|"
            );
            for d in &self.determinism {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} of {} | {} |",
                    d.device,
                    if d.bit_exact() { "yes" } else { "**no**" },
                    d.differing,
                    d.elements,
                    d.losses_equal
                );
            }
            s.push('\n');
        }
        for p in &self.pairs {
            let _ = writeln!(s, "## {} against {}\n\n**{}**\n", p.a, p.b, verdict(p));
            let t = &p.tolerance;
            let _ = writeln!(
                s,
                "Tolerances (f32; scaled error = max |a − b| ÷ max |b|): forward {:.0e}, \
                 gradients {:.0e}, weights after the step {:.0e}, router choices that differ \
                 {:.1}%, loss {:.0e} relative.\n",
                t.forward,
                t.gradient,
                t.weight,
                t.router_flips * 100.0,
                t.loss
            );
            for kind in [Kind::Forward, Kind::Router, Kind::Gradient, Kind::Weight] {
                let rows: Vec<_> = p.entries.iter().filter(|e| e.kind == kind).collect();
                if rows.is_empty() {
                    continue;
                }
                let worst = rows.iter().map(|e| e.distance.scaled).fold(0.0, f64::max);
                let failing = rows.iter().filter(|e| !e.ok).count();
                let _ = writeln!(
                    s,
                    "### {} ({} tensors, {failing} out of tolerance, worst scaled error {worst:.2e})\n",
                    kind.as_str(),
                    rows.len()
                );
                let _ = writeln!(
                    s,
                    "| tensor | shape | max abs | scaled | max rel | cosine | max ULP | ok |\n\
                     |---|---|---:|---:|---:|---:|---:|---|"
                );
                for e in rows {
                    let d = &e.distance;
                    let extra = match (&e.problem, e.flips) {
                        (Some(problem), _) => format!(" ({problem})"),
                        (None, Some(f)) => format!(" ({:.2}% of choices differ)", f * 100.0),
                        _ => String::new(),
                    };
                    let _ = writeln!(
                        s,
                        "| {}{extra} | {:?} | {:.2e} | {:.2e} | {:.2e} | {:.9} | {} | {} |",
                        e.name,
                        e.shape,
                        d.max_abs,
                        d.scaled,
                        d.max_rel,
                        d.cosine,
                        d.max_ulp,
                        if e.ok { "yes" } else { "**no**" }
                    );
                }
                s.push('\n');
            }
            if !p.only_in_a.is_empty() {
                let _ = writeln!(
                    s,
                    "Recorded by {} only (not compared): {}\n",
                    p.a,
                    p.only_in_a.join(", ")
                );
            }
            if p.loss_a.len() > 1 {
                let _ = writeln!(
                    s,
                    "| step | loss {} | loss {} | difference | router choices differing |\n\
                     |---:|---:|---:|---:|---:|",
                    p.a, p.b
                );
                for (i, (x, y)) in p.loss_a.iter().zip(&p.loss_b).enumerate() {
                    let flips = p
                        .route_flips
                        .get(i)
                        .map_or("—".to_string(), |n| n.to_string());
                    let _ = writeln!(
                        s,
                        "| {} | {x:.7} | {y:.7} | {:+.2e} | {flips} |",
                        i + 1,
                        x - y
                    );
                }
                s.push('\n');
            }
        }
        s
    }
}

/// One line: whether `a` matches `b`, and where they first part.
pub fn verdict(p: &PairReport) -> String {
    let routing = match p.first_route_flip {
        Some(step) => format!(
            "; router choices first differ at step {step} ({} of them), after which the losses \
             part by up to {:.1e} relative (a near-tie between two experts went the other way; \
             reported, not judged)",
            p.route_flips[step - 1],
            p.loss_max_rel_after_flip
        ),
        None if !p.route_flips.is_empty() => {
            format!(
                "; router choices identical at all {} steps",
                p.route_flips.len()
            )
        }
        None => String::new(),
    };
    verdict_alone(p) + &routing
}

fn verdict_alone(p: &PairReport) -> String {
    if p.ok {
        let worst: Vec<String> = [Kind::Forward, Kind::Gradient, Kind::Weight]
            .into_iter()
            .filter_map(|k| {
                let scaled = p
                    .entries
                    .iter()
                    .filter(|e| e.kind == k)
                    .map(|e| e.distance.scaled);
                scaled
                    .reduce(f64::max)
                    .map(|w| format!("{} {w:.1e}", k.as_str()))
            })
            .collect();
        format!(
            "{} matches {}: {} tensors within tolerance (worst scaled error: {}); loss within \
             {:.1e} relative over {} step(s)",
            p.a,
            p.b,
            p.entries.len(),
            worst.join(", "),
            p.loss_max_rel,
            p.first_route_flip
                .map_or(p.loss_a.len().min(p.loss_b.len()), |s| s - 1)
        )
    } else if let Some(first) = &p.first_divergence {
        let e = p
            .entries
            .iter()
            .find(|e| format!("{} {}", e.kind.as_str(), e.name) == *first);
        let how = e.map_or(String::new(), |e| match (&e.problem, e.flips) {
            (Some(problem), _) => format!(": {problem}"),
            (None, Some(f)) => format!(": {:.2}% of router choices differ", f * 100.0),
            _ => format!(
                ": scaled error {:.2e}, max abs {:.2e}, cosine {:.6}",
                e.distance.scaled, e.distance.max_abs, e.distance.cosine
            ),
        });
        format!("{} and {} part first at {first}{how}", p.a, p.b)
    } else if p.entries.is_empty() {
        format!("{} and {} have no tensor in common", p.a, p.b)
    } else {
        format!(
            "{} and {} agree on every tensor of the recorded step, but the loss parts by {:.2e} relative over {} steps",
            p.a,
            p.b,
            p.loss_max_rel,
            p.loss_a.len()
        )
    }
}

fn plot_loss_difference(pairs: &[PairReport], path: &Path) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = pairs
        .iter()
        .map(|p| {
            let points = p
                .loss_a
                .iter()
                .zip(&p.loss_b)
                .enumerate()
                .map(|(i, (x, y))| ((i + 1) as f64, x - y))
                .collect();
            (format!("{} − {}", p.a, p.b), points)
        })
        .collect();
    let steps = series.iter().map(|s| s.1.len()).max().unwrap_or(1) as f64;
    let span = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1.abs()))
        .filter(|v| v.is_finite())
        .fold(1e-9, f64::max)
        * 1.1;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    nuwa_core::plot::svg(path, (800, 480), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("training loss difference per step", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(72)
            .build_cartesian_2d(1f64..steps.max(2.0), -span..span)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss difference (nats/token)")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()?;
        for (i, (label, points)) in series.iter().enumerate() {
            let colour = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        }
        nuwa_core::plot::legend(&mut chart)
    })
}
