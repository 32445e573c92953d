//! `nuwa parity`: does nuwa train the same on every device? Runs one training recipe on
//! several devices in this process and compares them tensor by tensor; `nuwa parity compare`
//! compares two dumps (from `--dump-dir`, another machine, or tests/reference/torch_dump.py).

use crate::device;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use nuwa_model::ModelConfig;
use nuwa_parity::{compare, Dump, Recipe, Report, Target, Tolerance};
use std::path::PathBuf;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ParityArgs {
    #[command(subcommand)]
    command: Option<ParityCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
pub enum ParityCommand {
    /// Compare two dumps: the first against the second (the reference).
    Compare(CompareArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// Devices to compare, the first being the reference: cpu, cpu-reference (the CPU with
    /// every op on its plain Burn composition), ndarray, wgpu:N, vulkan:N, cuda:N, rocm:N,
    /// metal:N.
    #[arg(long, value_delimiter = ',', default_value = "cpu,cpu-reference")]
    devices: Vec<String>,
    /// A built-in model (tiny-moe, tiny-dense, …).
    #[arg(long, default_value = "tiny-moe", conflicts_with = "model_config")]
    preset: String,
    /// A model config file (HF config.json or TOML) instead of a preset.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// A Hugging Face checkpoint folder: its model and weights instead of a seeded one (its
    /// dump can then be compared with tests/reference/torch_dump.py's of the same folder).
    #[arg(long, conflicts_with_all = ["preset", "model_config"])]
    hf: Option<PathBuf>,
    /// Training steps; the first is compared tensor by tensor, the loss of every one.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for the report (parity.md, parity.json, loss-difference.svg).
    #[arg(long, default_value = "parity")]
    out: PathBuf,
    /// Also write each device's first-step dump under this folder (one subfolder per device).
    #[arg(long)]
    dump_dir: Option<PathBuf>,
    /// Also run each device a second time and report whether it repeats itself bit for bit.
    /// (flex is bit-exact run to run and across thread counts: its reductions have a fixed
    /// order; a GPU backend may not be.)
    #[arg(long)]
    deterministic: bool,
}

#[derive(Args)]
pub struct CompareArgs {
    /// The dump to check.
    a: PathBuf,
    /// The reference dump.
    b: PathBuf,
    /// Folder for the report.
    #[arg(long, default_value = "parity")]
    out: PathBuf,
}

pub fn parity(a: ParityArgs) -> Result<()> {
    let report = match a.command {
        Some(ParityCommand::Compare(c)) => {
            let (da, db) = (Dump::read(&c.a)?, Dump::read(&c.b)?);
            let pair = compare(&da, &db, &[da.loss], &[db.loss], &Tolerance::F32);
            let report = Report {
                recipe: format!(
                    "Dumps: {} (step {}, {}) against {} (step {}, {}).",
                    c.a.display(),
                    da.step,
                    da.source,
                    c.b.display(),
                    db.step,
                    db.source
                ),
                devices: Vec::new(),
                pairs: vec![pair],
                determinism: Vec::new(),
            };
            report.write(&c.out)?;
            (report, c.out)
        }
        None => run(a.run)?,
    };
    let (report, out) = report;
    for line in report.verdicts() {
        println!("{line}");
    }
    println!("report: {}", out.join("parity.md").display());
    if !report.ok() {
        bail!(
            "parity: out of tolerance (see {})",
            out.join("parity.md").display()
        );
    }
    Ok(())
}

/// A device by name, `NAME-reference` meaning that device with every op on its plain Burn
/// composition (`cpu-reference`); shared with `nuwa train --parity-device`.
pub fn target(name: &str) -> Result<Target> {
    let (device_name, reference_path) = match name.strip_suffix("-reference") {
        Some(base) => (base, true),
        None => (name, false),
    };
    Ok(Target {
        name: name.to_string(),
        device: device::parse_device(device_name)?,
        reference_path,
    })
}

fn run(a: RunArgs) -> Result<(Report, PathBuf)> {
    if a.devices.len() < 2 {
        bail!("--devices: name at least two devices (the first is the reference)");
    }
    if a.steps == 0 || a.batch_size == 0 || a.seq_len == 0 {
        bail!("--steps, --batch-size and --seq-len must be positive");
    }
    let targets = a
        .devices
        .iter()
        .map(|d| target(d))
        .collect::<Result<Vec<_>>>()?;
    let (mut model, weights) = match (&a.hf, &a.model_config) {
        (Some(dir), _) => {
            let ckpt = nuwa_hf::HfCheckpoint::open(dir)?;
            nuwa_hf::import::check_fits_in_memory(&ckpt.config, 2 * a.devices.len() as u64)?;
            (ckpt.config.clone(), Some(ckpt.load_weights()?))
        }
        (None, Some(path)) => (ModelConfig::from_file(path)?, None),
        (None, None) => (ModelConfig::preset(&a.preset)?, None),
    };
    // Dropout draws from each device's own generator; parity compares the arithmetic.
    model.embedding_dropout = 0.0;
    model.attention_dropout = 0.0;
    model.output_dropout = 0.0;
    if a.seq_len > model.max_position_embeddings {
        bail!(
            "--seq-len {}: longer than the model's max_position_embeddings ({})",
            a.seq_len,
            model.max_position_embeddings
        );
    }
    let defaults = nuwa_run::TrainConfig::default();
    let recipe = Recipe {
        model,
        seed: a.seed,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        steps: a.steps,
        lr: a.lr,
        weight_decay: defaults.weight_decay,
        grad_clip: defaults.grad_clip,
        aux_loss_coef: defaults.aux_loss_coef,
        z_loss_coef: defaults.z_loss_coef,
    };
    let weights = match weights {
        Some(w) => w,
        None => nuwa_parity::initial_weights(&recipe, &targets[0].device)?,
    };
    let (mut report, runs) =
        nuwa_parity::run_targets(&recipe, &targets, Some(weights.clone()), None, |name| {
            eprintln!("parity: {} steps on {name}", recipe.steps);
        })?;
    if a.deterministic {
        for (target, first) in targets.iter().zip(&runs) {
            eprintln!("parity: {} steps on {} again", recipe.steps, target.name);
            report
                .determinism
                .push(nuwa_parity::repeat_run(&recipe, target, &weights, first)?);
        }
        for d in &report.determinism {
            println!(
                "{}: {} run to run ({} of {} elements differ; losses {})",
                d.device,
                if d.bit_exact() {
                    "bit-exact"
                } else {
                    "not bit-exact"
                },
                d.differing,
                d.elements,
                if d.losses_equal { "equal" } else { "differ" }
            );
        }
    }
    if let Some(dir) = &a.dump_dir {
        for r in &runs {
            r.dump.write(&dir.join(r.name.replace(':', "-")))?;
        }
    }
    report.write(&a.out)?;
    Ok((report, a.out))
}
