//! Running the same training on several devices in one process: the same weights (copied from
//! one host copy), the same batches, the same AdamW steps — the first step recorded tensor by
//! tensor, every step's loss kept.

use crate::dump::{Dump, DumpBatch, Entry, Kind};
use anyhow::{bail, Result};
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use nuwa_data::Batch;
use nuwa_model::path::{by_path, ReadParam};
use nuwa_model::trace::{Perturbation, Recorder};
use nuwa_model::weights::{assign_weights, collect_weights, HostTensor};
use nuwa_model::{LanguageModel, ModelConfig};
use nuwa_train::optim::{grad_norm, AdamW, AdamWConfig};
use nuwa_train::step::forward_losses;
use std::collections::BTreeMap;
use std::time::Instant;

/// A device to run on, by the name the user gave it.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub device: Device,
    /// Every op on its plain Burn composition (`cpu-reference`): the kernels switched off.
    pub reference_path: bool,
}

/// The training both devices run.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub model: ModelConfig,
    pub seed: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub aux_loss_coef: f64,
    pub z_loss_coef: f64,
}

/// How a step is taken besides its batch.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub lr: f64,
    pub grad_clip: f64,
    pub aux_loss_coef: f64,
    pub z_loss_coef: f64,
}

impl Recipe {
    pub fn settings(&self) -> StepSettings {
        StepSettings {
            lr: self.lr,
            grad_clip: self.grad_clip,
            aux_loss_coef: self.aux_loss_coef,
            z_loss_coef: self.z_loss_coef,
        }
    }
}

/// What one device computed.
pub struct DeviceRun {
    pub name: String,
    /// The first step, tensor by tensor.
    pub dump: Dump,
    /// The training loss of every step.
    pub losses: Vec<f64>,
    /// Every step's router choices, all MoE layers concatenated (empty for a dense model).
    pub routes: Vec<Vec<f32>>,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Deterministic batches of random tokens: batch `i` of `recipe`.
pub fn batch(recipe: &Recipe, i: usize) -> Batch {
    let (b, t) = (recipe.batch_size, recipe.seq_len);
    let ids = nuwa_train::bench::random_tokens(
        b * (t + 1),
        recipe.model.vocab_size,
        recipe.seed ^ (0x9e37 + i as u64),
    );
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for row in ids.chunks(t + 1) {
        inputs.extend(row[..t].iter().map(|&v| v as u32));
        targets.extend(row[1..].iter().map(|&v| v as u32));
    }
    Batch {
        inputs,
        targets,
        batch_size: b,
        seq_len: t,
        offsets: (0..b).collect(),
    }
}

/// A batch as a dump records it.
pub fn dump_batch(b: &Batch) -> DumpBatch {
    DumpBatch {
        batch_size: b.batch_size,
        seq_len: b.seq_len,
        inputs: b.inputs.clone(),
        targets: b.targets.clone(),
    }
}

struct GradOf<'a>(&'a GradientsParams);

impl ReadParam for GradOf<'_> {
    type Out = Option<HostTensor>;
    fn read<const D: usize>(&mut self, param: &Param<Tensor<D>>) -> Option<HostTensor> {
        self.0.get::<D>(param.id).map(HostTensor::from_tensor)
    }
}

fn entries(kind: Kind, tensors: BTreeMap<String, HostTensor>) -> impl Iterator<Item = Entry> {
    tensors.into_iter().map(move |(name, t)| Entry {
        kind,
        name,
        shape: t.shape,
        values: t.data,
    })
}

/// One AdamW step on `batch`, as the trainer takes it (cross-entropy plus the weighted router
/// and MTP losses, gradient clipping); with `record`, every tensor of the step goes into a
/// dump, else only the router's choices are returned.
pub fn step(
    model: LanguageModel,
    opt: &mut AdamW,
    batch: &Batch,
    device: &Device,
    recipe: &StepSettings,
    record: Option<Option<Perturbation>>,
) -> (f64, LanguageModel, Vec<Entry>) {
    let full = record.is_some();
    let recorder = match record {
        Some(perturb) => Recorder::start(perturb),
        None => Recorder::start_router_only(),
    };
    let losses = forward_losses(&model, batch, device, None);
    let mut total = losses.ce.clone();
    if let (Some(lb), Some(z)) = (&losses.load_balance, &losses.z_loss) {
        total = total + lb.clone() * recipe.aux_loss_coef + z.clone() * recipe.z_loss_coef;
    }
    if let Some(mtp) = &losses.mtp {
        total = total + mtp.clone() * model.mtp_loss_weight;
    }
    let taps = recorder.finish();
    let loss = total.clone().into_scalar::<f32>() as f64;
    let grads = GradientsParams::from_grads(total.backward(), &model);
    let norm = grad_norm(&model, &grads);
    let scale = if recipe.grad_clip > 0.0 && norm > recipe.grad_clip {
        recipe.grad_clip / norm
    } else {
        1.0
    };
    let mut out = Vec::new();
    {
        out.extend(taps.into_iter().map(|t| Entry {
            kind: if t.name.ends_with("experts_chosen") {
                Kind::Router
            } else {
                Kind::Forward
            },
            name: t.name,
            shape: t.shape,
            values: t.values,
        }));
    }
    if full {
        let grads_by_path: BTreeMap<String, HostTensor> = by_path(&model, GradOf(&grads))
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        out.extend(entries(Kind::Gradient, grads_by_path));
    }
    let model = opt.step(model, grads, recipe.lr, scale);
    if full {
        out.extend(entries(Kind::Weight, collect_weights(&model)));
    }
    (loss, model, out)
}

/// Trains `recipe` on `target` from `weights`; the first step is recorded (with `perturb`
/// applied there, for tests).
pub fn run_on(
    target: &Target,
    recipe: &Recipe,
    weights: &BTreeMap<String, HostTensor>,
    perturb: Option<Perturbation>,
) -> Result<DeviceRun> {
    let go = || -> Result<DeviceRun> {
        let ad = target.device.clone().autodiff();
        let mut model = assign_weights(
            LanguageModel::uninitialised(&recipe.model, &ad),
            weights,
            "parity weights",
        )?;
        let mut opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: recipe.weight_decay,
        });
        let started = Instant::now();
        let mut losses = Vec::with_capacity(recipe.steps);
        let mut routes = Vec::with_capacity(recipe.steps);
        let mut dump = None;
        for i in 0..recipe.steps {
            let record = (i == 0).then(|| perturb.clone());
            let (loss, next, entries) = step(
                model,
                &mut opt,
                &batch(recipe, i),
                &ad,
                &recipe.settings(),
                record,
            );
            model = next;
            losses.push(loss);
            routes.push(
                entries
                    .iter()
                    .filter(|e| e.kind == Kind::Router)
                    .flat_map(|e| e.values.iter().copied())
                    .collect(),
            );
            if i == 0 {
                dump = Some(Dump {
                    source: target.name.clone(),
                    step: 1,
                    loss,
                    batch: Some(dump_batch(&batch(recipe, 0))),
                    entries,
                });
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let Some(dump) = dump else {
            bail!("--steps: must be at least 1");
        };
        Ok(DeviceRun {
            name: target.name.clone(),
            dump,
            losses,
            routes,
            seconds,
            tokens_per_s: (recipe.steps * recipe.batch_size * recipe.seq_len) as f64 / seconds,
        })
    };
    if target.reference_path {
        nuwa_model::kernels::with_reference_path(go)
    } else {
        go()
    }
}

/// The recipe's initial weights, made once on the host side of `device` (every device then
/// starts from these exact values).
pub fn initial_weights(recipe: &Recipe, device: &Device) -> Result<BTreeMap<String, HostTensor>> {
    recipe.model.validate()?;
    Ok(collect_weights(&LanguageModel::new(
        &recipe.model,
        device,
        recipe.seed,
    )))
}
