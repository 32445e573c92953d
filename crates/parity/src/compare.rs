//! Two dumps compared tensor by tensor, in the order the first one computed them: distances,
//! a verdict against tolerances, and the first tensor where they part.

use crate::dump::{Dump, Entry, Kind};
use serde::Serialize;
use std::collections::HashMap;

/// How far apart two f32 tensors may be. "Scaled error" is the largest absolute difference
/// divided by the reference's largest magnitude: scale-free, and not blown up by elements
/// near zero the way an element-wise relative error is.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    pub forward: f64,
    pub gradient: f64,
    pub weight: f64,
    /// Fraction of (token, slot) router choices that may differ (a near-tie between two
    /// experts' scores goes either way under a different summation order).
    pub router_flips: f64,
    /// Largest difference of the per-step training loss, relative to the loss.
    pub loss: f64,
}

impl Tolerance {
    /// f32 on both sides. Measured between the flex kernels and the plain compositions:
    /// forward ≤ 7e-7, gradients ≤ 2e-6, weights after the first step ≤ 1.5e-4. The weights
    /// part most because AdamW's first step moves each element by lr · g / (|g| + eps): an
    /// element whose gradient is near zero moves by an lr-sized amount that rounding decides.
    pub const F32: Tolerance = Tolerance {
        forward: 1e-4,
        gradient: 1e-3,
        weight: 1e-3,
        router_flips: 0.01,
        loss: 1e-4,
    };

    fn of(&self, kind: Kind) -> f64 {
        match kind {
            Kind::Forward => self.forward,
            Kind::Gradient => self.gradient,
            Kind::Weight => self.weight,
            Kind::Router => self.router_flips,
        }
    }
}

/// Distances between a tensor and its reference.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Distance {
    pub max_abs: f64,
    /// max |a − b| / max |b|.
    pub scaled: f64,
    /// Element-wise max |a − b| / |b|, with |b| floored at 1e-3 · max |b|.
    pub max_rel: f64,
    pub cosine: f64,
    /// Largest distance in units in the last place of f32.
    pub max_ulp: u64,
    /// Elements that differ at all.
    pub differing: usize,
}

fn ordered_bits(x: f32) -> i64 {
    let b = x.to_bits() as i32;
    (if b < 0 { i32::MIN - b } else { b }) as i64
}

/// Distances of `a` from the reference `b` (same length).
pub fn distance(a: &[f32], b: &[f32]) -> Distance {
    let ref_max = b.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let floor = (ref_max * 1e-3).max(f64::MIN_POSITIVE);
    let (mut d, mut dot, mut na, mut nb) = (Distance::default(), 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (xf, yf) = (x as f64, y as f64);
        let diff = (xf - yf).abs();
        d.max_abs = d.max_abs.max(diff);
        d.max_rel = d.max_rel.max(diff / yf.abs().max(floor));
        d.max_ulp = d.max_ulp.max(ordered_bits(x).abs_diff(ordered_bits(y)));
        d.differing += (x != y) as usize;
        dot += xf * yf;
        na += xf * xf;
        nb += yf * yf;
    }
    if d.max_abs.is_nan() || a.iter().chain(b).any(|v| !v.is_finite()) {
        d.max_abs = f64::INFINITY;
    }
    d.scaled = if ref_max > 0.0 {
        d.max_abs / ref_max
    } else {
        d.max_abs
    };
    d.cosine = if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE)
    };
    d
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryReport {
    pub kind: Kind,
    pub name: String,
    pub shape: Vec<usize>,
    pub distance: Distance,
    /// Router entries: the fraction of choices that differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flips: Option<f64>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `a` against the reference `b`.
#[derive(Debug, Clone, Serialize)]
pub struct PairReport {
    pub a: String,
    pub b: String,
    pub tolerance: Tolerance,
    pub entries: Vec<EntryReport>,
    /// Tensors of `a` that `b` does not have (another implementation may record fewer).
    pub only_in_a: Vec<String>,
    pub loss_a: Vec<f64>,
    pub loss_b: Vec<f64>,
    /// Largest |loss_a − loss_b| / |loss_b| over the steps both ran before the router's
    /// choices first differed (the losses are compared up to there).
    pub loss_max_rel: f64,
    /// Per step: how many router choices differ (MoE models; empty for dense ones).
    pub route_flips: Vec<usize>,
    /// The first step (1-based) whose router choices differ. From there the two runs follow
    /// different trajectories — a near-tie between two experts went the other way, as it can
    /// under any change of summation order — so later losses are reported, not judged.
    pub first_route_flip: Option<usize>,
    /// Largest relative loss difference from that step on.
    pub loss_max_rel_after_flip: f64,
    /// `KIND NAME` of the first tensor out of tolerance, in computation order.
    pub first_divergence: Option<String>,
    pub ok: bool,
}

fn compare_entry(a: &Entry, b: &Entry, tol: &Tolerance) -> EntryReport {
    let mut report = EntryReport {
        kind: a.kind,
        name: a.name.clone(),
        shape: a.shape.clone(),
        distance: Distance::default(),
        flips: None,
        ok: false,
        problem: None,
    };
    if a.shape != b.shape {
        report.problem = Some(format!("shape {:?} vs {:?}", a.shape, b.shape));
        return report;
    }
    report.distance = distance(&a.values, &b.values);
    let limit = tol.of(a.kind);
    report.ok = match a.kind {
        Kind::Router => {
            let flips = report.distance.differing as f64 / a.values.len().max(1) as f64;
            report.flips = Some(flips);
            flips <= limit
        }
        _ => report.distance.scaled <= limit,
    };
    report
}

/// Compares `a` with the reference `b`: every tensor of `a` that `b` also has, and the losses.
pub fn compare(a: &Dump, b: &Dump, loss_a: &[f64], loss_b: &[f64], tol: &Tolerance) -> PairReport {
    compare_runs(a, b, loss_a, loss_b, &[], &[], tol)
}

/// [`compare`], with each step's router choices (for MoE: the losses are judged up to the
/// first step whose routing differs).
pub fn compare_runs(
    a: &Dump,
    b: &Dump,
    loss_a: &[f64],
    loss_b: &[f64],
    routes_a: &[Vec<f32>],
    routes_b: &[Vec<f32>],
    tol: &Tolerance,
) -> PairReport {
    let index: HashMap<(Kind, &str), &Entry> = b
        .entries
        .iter()
        .map(|e| ((e.kind, e.name.as_str()), e))
        .collect();
    let mut entries = Vec::new();
    let mut only_in_a = Vec::new();
    for e in &a.entries {
        match index.get(&(e.kind, e.name.as_str())) {
            Some(other) => entries.push(compare_entry(e, other, tol)),
            None => only_in_a.push(format!("{} {}", e.kind.as_str(), e.name)),
        }
    }
    // A dense model records no routes: nothing to compare.
    let routed = routes_a.iter().chain(routes_b).any(|r| !r.is_empty());
    let route_flips: Vec<usize> = routes_a
        .iter()
        .take(if routed { usize::MAX } else { 0 })
        .zip(routes_b)
        .map(|(x, y)| {
            let differing = x.iter().zip(y).filter(|(p, q)| p != q).count();
            differing + x.len().abs_diff(y.len())
        })
        .collect();
    let first_route_flip = route_flips.iter().position(|&n| n > 0).map(|i| i + 1);
    let rel = |(x, y): (&f64, &f64)| {
        let r = (x - y).abs() / y.abs().max(1e-12);
        if r.is_nan() {
            f64::INFINITY
        } else {
            r
        }
    };
    let judged = first_route_flip.map_or(usize::MAX, |s| s - 1);
    let loss_max_rel = loss_a
        .iter()
        .zip(loss_b)
        .take(judged)
        .map(rel)
        .fold(0.0, f64::max);
    let loss_max_rel_after_flip = loss_a
        .iter()
        .zip(loss_b)
        .skip(judged.min(loss_a.len()))
        .map(rel)
        .fold(0.0, f64::max);
    let first_divergence = entries
        .iter()
        .find(|e| !e.ok)
        .map(|e| format!("{} {}", e.kind.as_str(), e.name));
    let ok = first_divergence.is_none() && loss_max_rel <= tol.loss && !entries.is_empty();
    PairReport {
        a: a.source.clone(),
        b: b.source.clone(),
        tolerance: *tol,
        entries,
        only_in_a,
        loss_a: loss_a.to_vec(),
        loss_b: loss_b.to_vec(),
        loss_max_rel,
        route_flips,
        first_route_flip,
        loss_max_rel_after_flip,
        first_divergence,
        ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, name: &str, values: Vec<f32>) -> Entry {
        Entry {
            kind,
            name: name.into(),
            shape: vec![values.len()],
            values,
        }
    }

    #[test]
    fn distances_are_measured_as_defined() {
        let d = distance(&[1.0, 2.0, 0.0], &[1.0, 2.0, 0.0]);
        assert_eq!((d.max_abs, d.max_ulp, d.differing), (0.0, 0, 0));
        assert!((d.cosine - 1.0).abs() < 1e-12);
        let next = f32::from_bits(1.0f32.to_bits() + 3);
        let d = distance(&[next, -4.0], &[1.0, -4.0]);
        assert_eq!(d.max_ulp, 3);
        assert!((d.scaled - (next as f64 - 1.0) / 4.0).abs() < 1e-15);
        // Across zero, ULPs count through it.
        let d = distance(&[-0.0], &[f32::from_bits(1)]);
        assert_eq!(d.max_ulp, 1);
        let d = distance(&[f32::NAN], &[1.0]);
        assert!(d.max_abs.is_infinite());
        let d = distance(&[1.0, 0.0], &[0.0, 1.0]);
        assert!(d.cosine.abs() < 1e-12);
    }

    #[test]
    fn the_first_tensor_out_of_tolerance_is_named_in_computation_order() {
        let tol = Tolerance::F32;
        let a = Dump {
            source: "a".into(),
            step: 1,
            loss: 1.0,
            batch: None,
            entries: vec![
                entry(Kind::Forward, "layers.0.attention", vec![1.0, 2.0]),
                entry(Kind::Router, "layers.0.moe.experts_chosen", vec![1.0, 2.0]),
                entry(Kind::Forward, "layers.0.moe", vec![1.0, 2.1]),
                entry(Kind::Gradient, "norm.weight", vec![5.0, 5.0]),
                entry(Kind::Forward, "extra", vec![1.0]),
            ],
        };
        let mut b = a.clone();
        b.source = "b".into();
        b.entries.pop();
        b.entries[0].values[1] = 2.0 + 1e-6; // within tolerance
        b.entries[2].values[1] = 2.0; // out
        b.entries[3].values[1] = 4.0; // out, later
        let r = compare(&a, &b, &[1.0, 2.0], &[1.0, 2.0], &tol);
        assert!(!r.ok);
        assert_eq!(r.first_divergence.as_deref(), Some("forward layers.0.moe"));
        assert_eq!(r.only_in_a, ["forward extra"]);
        assert!(r.entries[0].ok && r.entries[1].ok);
        assert!(!r.entries[3].ok);

        let r = compare(&a, &a, &[1.0, 2.0], &[1.0, 2.0 + 1e-3], &tol);
        assert!(r.first_divergence.is_none());
        assert!(!r.ok, "the loss curves part by 5e-4 relative");
        let r = compare(&a, &a, &[1.0], &[1.0], &tol);
        assert!(r.ok);

        // Routing that differs from step 2 on: the loss is judged on step 1 only.
        let routes_a = vec![vec![1.0, 2.0], vec![1.0, 3.0], vec![1.0, 2.0]];
        let routes_b = vec![vec![1.0, 2.0], vec![1.0, 2.0], vec![1.0, 2.0]];
        let losses_b = [1.0, 2.0, 3.0];
        let r = compare_runs(
            &a,
            &a,
            &[1.0, 2.5, 3.0],
            &losses_b,
            &routes_a,
            &routes_b,
            &tol,
        );
        assert!(r.ok);
        assert_eq!(r.first_route_flip, Some(2));
        assert_eq!(r.route_flips, [0, 1, 0]);
        assert!((r.loss_max_rel_after_flip - 0.25).abs() < 1e-12);
        let r = compare_runs(
            &a,
            &a,
            &[1.5, 2.5, 3.0],
            &losses_b,
            &routes_a,
            &routes_b,
            &tol,
        );
        assert!(!r.ok, "step 1 differs before any flip");

        let mut flipped = a.clone();
        flipped.entries[1].values[0] = 3.0;
        let r = compare(&flipped, &a, &[], &[], &tol);
        assert_eq!(r.entries[1].flips, Some(0.5));
        assert_eq!(
            r.first_divergence.as_deref(),
            Some("router layers.0.moe.experts_chosen")
        );
        let mut reshaped = a.clone();
        reshaped.entries[0].shape = vec![2, 1];
        let r = compare(&reshaped, &a, &[], &[], &tol);
        assert!(r.entries[0].problem.as_deref().unwrap().contains("shape"));
    }
}
