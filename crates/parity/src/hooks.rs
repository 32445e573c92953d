//! Parity inside a training run, as [`StepHook`]s: `nuwa train --dump-tensors` writes the
//! dump of chosen steps, and `nuwa train --parity-every N` recomputes a step's micro-batch on a
//! second device (or the reference path) every N steps and puts the divergence into
//! metrics.jsonl — so a heterogeneous job notices drift while it trains. Both work on copies;
//! the run trains exactly as it would without them.

use crate::capture::{dump_batch, step, StepSettings, Target};
use crate::compare::{compare, Tolerance};
use crate::dump::{Dump, Kind};
use anyhow::Result;
use nuwa_model::weights::{assign_weights, collect_weights};
use nuwa_model::LanguageModel;
use nuwa_train::optim::AdamW;
use nuwa_train::{StepHook, StepView};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn settings(v: &StepView) -> StepSettings {
    StepSettings {
        lr: v.lr,
        grad_clip: v.train.grad_clip,
        aux_loss_coef: v.train.aux_loss_coef,
        z_loss_coef: v.train.z_loss_coef,
    }
}

/// The step's tensors, computed from copies of the model and optimizer on `v.device`.
fn dump_here(v: &StepView, source: &str) -> Dump {
    let mut opt = v.opt.clone();
    let (loss, _, entries) = step(
        v.model.clone(),
        &mut opt,
        v.batch,
        v.device,
        &settings(v),
        Some(None),
    );
    Dump {
        source: source.to_string(),
        step: v.step,
        loss,
        batch: Some(dump_batch(v.batch)),
        entries,
    }
}

/// Writes `DIR/step-NNNNNNNN/` for each listed step.
pub struct DumpHook {
    pub steps: BTreeSet<u64>,
    pub dir: PathBuf,
    /// The device's name, recorded in the dump.
    pub source: String,
}

impl StepHook for DumpHook {
    fn before_step(&mut self, v: &StepView) -> Result<Map<String, Value>> {
        let mut metrics = Map::new();
        if self.steps.contains(&v.step) {
            let dir = self.dir.join(format!("step-{:08}", v.step));
            dump_here(v, &self.source).write(&dir)?;
            metrics.insert("dumped".into(), json!(dir.display().to_string()));
        }
        Ok(metrics)
    }
}

/// Every `every` steps: the step's first micro-batch on `other` too, compared.
pub struct ParityHook {
    pub every: u64,
    pub here: String,
    pub other: Target,
}

impl StepHook for ParityHook {
    fn before_step(&mut self, v: &StepView) -> Result<Map<String, Value>> {
        let mut metrics = Map::new();
        if self.every == 0 || !v.step.is_multiple_of(self.every) {
            return Ok(metrics);
        }
        let go = || -> Result<Dump> {
            let device = self.other.device.clone().autodiff();
            let model = assign_weights(
                LanguageModel::uninitialised(v.model_config, &device),
                &collect_weights(v.model),
                "parity copy",
            )?;
            // The optimizer's state stays where it is: the copy takes a first AdamW step, and
            // so does this device's copy below, so the two compare like with like.
            let mut opt = AdamW::new(v.opt.config);
            let (loss, _, entries) =
                step(model, &mut opt, v.batch, &device, &settings(v), Some(None));
            Ok(Dump {
                source: self.other.name.clone(),
                step: v.step,
                loss,
                batch: None,
                entries,
            })
        };
        let theirs = if self.other.reference_path {
            nuwa_model::kernels::with_reference_path(go)?
        } else {
            go()?
        };
        let mut fresh = AdamW::new(v.opt.config);
        let (loss, _, entries) = step(
            v.model.clone(),
            &mut fresh,
            v.batch,
            v.device,
            &settings(v),
            Some(None),
        );
        let mine = Dump {
            source: self.here.clone(),
            step: v.step,
            loss,
            batch: None,
            entries,
        };
        let r = compare(
            &theirs,
            &mine,
            &[theirs.loss],
            &[mine.loss],
            &Tolerance::F32,
        );
        let worst = |k: Kind| {
            r.entries
                .iter()
                .filter(|e| e.kind == k)
                .map(|e| e.distance.scaled)
                .fold(0.0, f64::max)
        };
        metrics.insert("parity_device".into(), json!(self.other.name));
        metrics.insert("parity_ok".into(), json!(r.ok));
        metrics.insert("parity_loss_rel".into(), json!(r.loss_max_rel));
        metrics.insert("parity_forward_max".into(), json!(worst(Kind::Forward)));
        metrics.insert("parity_gradient_max".into(), json!(worst(Kind::Gradient)));
        if let Some(first) = r.first_divergence {
            metrics.insert("parity_first_divergence".into(), json!(first));
        }
        Ok(metrics)
    }
}
