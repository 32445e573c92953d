//! `nuwa plan`: the cost planner's command line (search, calibrate, verify, the Ant example).

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use nuwa_model::ModelConfig;
use nuwa_plan::{
    cost, parse_count, parse_days, report, search, Calibration, Catalogue, Constraints, Device,
    Inventory, Layout, Objective, Point, Workload, DEFAULT_EFFICIENCY,
};
use std::path::{Path, PathBuf};

pub const LOCAL_CPU: &str = "local-cpu";
const DEFAULT_CALIBRATION: &str = "nuwa-calibration.json";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    action: Option<PlanCommand>,
    #[command(flatten)]
    search: SearchArgs,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Measure this machine's training efficiency with short nuwa runs, for the cost model.
    Calibrate(CalibrateArgs),
    /// Run a plan nuwa can run here and compare its predicted and measured step time.
    Verify(VerifyArgs),
    /// The arithmetic behind Ant's published cost per 1T tokens, as Markdown.
    AntExample(CatalogueArg),
}

#[derive(Args)]
struct CatalogueArg {
    /// A TOML catalogue adding to or overriding the built-in one.
    #[arg(long)]
    catalogue: Option<PathBuf>,
}

#[derive(Args)]
struct SearchArgs {
    /// A preset (ling-plus, ling-lite, tiny-moe, ...) or a model config file.
    #[arg(long, default_value = "ling-plus")]
    model: String,
    /// Training tokens: 1T, 500B, 2e12.
    #[arg(long, default_value = "1T")]
    tokens: String,
    /// The devices you can get (TOML: currency, [[device]] name/count/price_per_hour...).
    #[arg(long)]
    inventory: Option<PathBuf>,
    #[command(flatten)]
    catalogue: CatalogueArg,
    /// Finish within: 30d, 12h, 6w.
    #[arg(long)]
    deadline: Option<String>,
    /// Spend at most this much (in the inventory's currency).
    #[arg(long)]
    budget: Option<f64>,
    /// Least fraction of the plan's devices that are domestic (e.g. 0.5).
    #[arg(long)]
    domestic_share: Option<f64>,
    /// cost | time
    #[arg(long, default_value = "cost")]
    objective: String,
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    /// Sequences per optimiser step.
    #[arg(long, default_value_t = 1024)]
    global_batch: usize,
    /// Efficiency for a device: NAME=MFU (overrides calibration and the default).
    #[arg(long)]
    efficiency: Vec<String>,
    /// Calibration from `nuwa plan calibrate` (default nuwa-calibration.json if present).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Plans to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Write every feasible plan (and the rejected tempting ones) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the cost-vs-time frontier (SVG).
    #[arg(long, default_value = "plan.svg")]
    plot: PathBuf,
}

#[derive(Args)]
struct CalibrateArgs {
    /// Where to store the measurements.
    #[arg(long, default_value = DEFAULT_CALIBRATION)]
    out: PathBuf,
    /// Timed steps per shape (the fastest counts).
    #[arg(long, default_value_t = 3)]
    steps: usize,
}

#[derive(Args)]
struct VerifyArgs {
    /// A benchmark shape (A, B, C, C-dense) to run here.
    #[arg(long, default_value = "C-dense")]
    shape: String,
    #[arg(long, default_value = DEFAULT_CALIBRATION)]
    calibration: PathBuf,
    /// Calibrate in the same run (saved to --calibration), timing the calibration shapes and
    /// this one in turn so that both see the same machine.
    #[arg(long)]
    calibrate: bool,
    /// Timed steps per shape (the fastest counts).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Price of this machine per hour, to show predicted and measured cost.
    #[arg(long, default_value_t = 0.0)]
    price_per_hour: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PlanArgs) -> Result<()> {
    match a.action {
        Some(PlanCommand::Calibrate(c)) => calibrate(c),
        Some(PlanCommand::Verify(v)) => verify(v),
        Some(PlanCommand::AntExample(c)) => {
            print!(
                "{}",
                nuwa_plan::ant_example(&catalogue(c.catalogue.as_deref())?)?
            );
            Ok(())
        }
        None => plan_search(a.search),
    }
}

/// This machine as a catalogue entry (peak from its CPU features, memory from the OS).
fn local_cpu() -> Device {
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

fn catalogue(extra: Option<&Path>) -> Result<Catalogue> {
    Catalogue::load(extra, local_cpu())
}

fn model(name: &str) -> Result<ModelConfig> {
    match ModelConfig::preset(name) {
        Ok(c) => Ok(c),
        Err(_) if Path::new(name).exists() => crate::model_config_file(Path::new(name)),
        Err(e) => Err(anyhow!("--model {name}: {e}, and no such config file")),
    }
}

fn plan_search(a: SearchArgs) -> Result<()> {
    let inv_path = a
        .inventory
        .clone()
        .ok_or_else(|| anyhow!("--inventory FILE is required (the devices you can get)"))?;
    let cfg = model(&a.model)?;
    let tokens = parse_count(&a.tokens).map_err(|e| anyhow!("--tokens: {e}"))?;
    let deadline = a
        .deadline
        .as_deref()
        .map(parse_days)
        .transpose()
        .map_err(|e| anyhow!("--deadline: {e}"))?;
    if let Some(s) = a.domestic_share {
        if !(0.0..=1.0).contains(&s) {
            bail!("--domestic-share {s}: must be in [0, 1]");
        }
    }
    if a.budget.is_some_and(|b| b.is_nan() || b <= 0.0) {
        bail!("--budget must be positive");
    }
    let objective = match a.objective.as_str() {
        "cost" => Objective::Cost,
        "time" => Objective::Time,
        o => bail!("--objective {o}: expected cost or time"),
    };
    if a.seq_len == 0 || a.global_batch == 0 {
        bail!("--seq-len and --global-batch must be positive");
    }
    let cat = catalogue(a.catalogue.catalogue.as_deref())?;
    let inventory = Inventory::load(&inv_path)?;
    let devices = inventory.resolve(&cat, &inv_path.display().to_string())?;
    let calibration = match &a.calibration {
        Some(p) => Calibration::load(p)?,
        None if Path::new(DEFAULT_CALIBRATION).exists() => {
            Calibration::load(Path::new(DEFAULT_CALIBRATION))?
        }
        None => Calibration::default(),
    };
    let mut overrides = std::collections::BTreeMap::new();
    for e in &a.efficiency {
        let (name, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--efficiency {e}: expected NAME=MFU"))?;
        let v: f64 = v
            .parse()
            .ok()
            .filter(|v| *v > 0.0 && *v <= 1.0)
            .ok_or_else(|| anyhow!("--efficiency {e}: MFU must be in (0, 1]"))?;
        overrides.insert(name.to_string(), v);
    }
    let w = Workload {
        model: cfg,
        seq_len: a.seq_len,
        global_batch: a.global_batch,
        tokens,
    };
    let step_flops = (a.global_batch * a.seq_len) as f64 * w.flops_per_token();
    let efficiency = |name: &str| -> f64 {
        overrides
            .get(name)
            .copied()
            .or_else(|| calibration.efficiency(name, step_flops))
            .unwrap_or(DEFAULT_EFFICIENCY)
    };
    let constraints = Constraints {
        deadline_days: deadline,
        budget: a.budget,
        domestic_share: a.domestic_share,
    };
    let mut all = search::enumerate(&w, &devices, &efficiency, &constraints);
    search::rank(&mut all, objective);
    let (feasible, rejected): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|p| p.violations.is_empty());
    for d in &devices {
        let eff = efficiency(&d.name);
        let how = if overrides.contains_key(&d.name) {
            "given"
        } else if calibration.efficiency(&d.name, step_flops).is_some() {
            "calibrated"
        } else {
            "default, uncalibrated"
        };
        let assumed = if d.assumed.is_empty() {
            String::new()
        } else {
            format!("; assumed: {}", d.assumed.join(", "))
        };
        println!(
            "{}: {} available, efficiency {:.0}% ({how}){assumed}",
            d.name,
            d.count,
            eff * 100.0
        );
    }
    if feasible.is_empty() {
        bail!(
            "no feasible plan for {} on {} tokens: {}",
            a.model,
            a.tokens,
            search::explain_infeasible(&rejected, &constraints)
        );
    }
    let top: Vec<&nuwa_plan::Plan> = feasible.iter().take(a.top).collect();
    println!(
        "\n{} feasible plans for {} on {} tokens; the best by {}:\n",
        feasible.len(),
        a.model,
        a.tokens,
        a.objective
    );
    print!("{}", report::table(&top, &inventory.currency));
    // The tempting plans: those that would beat the best feasible one but break a constraint.
    let best = &feasible[0];
    let mut seen = std::collections::BTreeSet::new();
    let tempting: Vec<&nuwa_plan::Plan> = rejected
        .iter()
        .filter(|p| match objective {
            Objective::Cost => p.total_cost < best.total_cost,
            Objective::Time => p.days < best.days,
        })
        // One per device mix and kind of violation, so three different reasons show.
        .filter(|p| {
            let kind = p
                .violations
                .iter()
                .map(|v| v.split(':').next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(",");
            seen.insert((p.describe(), kind))
        })
        .take(3)
        .collect();
    if !tempting.is_empty() {
        println!("\nbetter plans that are infeasible:");
        for p in &tempting {
            println!(
                "  {} {} ({:.1} days, {}/1T {:.3e}): {}",
                p.describe(),
                p.layout_text(),
                p.days,
                inventory.currency,
                p.cost_per_trillion,
                p.violations.join("; ")
            );
        }
    }
    report::plot_frontier(&feasible, &inventory.currency, &a.plot)?;
    println!("\ncost-vs-time frontier: {}", a.plot.display());
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "currency": inventory.currency, "tokens": tokens,
            "feasible": feasible.iter().take(1000).collect::<Vec<_>>(),
            "tempting_infeasible": tempting,
        });
        nuwa_core::atomic_write(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
        println!("plans as JSON: {}", path.display());
    }
    Ok(())
}

/// The shapes `calibrate` measures: a small and a large step, bracketing the others.
const CALIBRATION_SHAPES: [&str; 2] = ["A", "B"];

/// The fastest step of each shape, measured round-robin (one untimed round, then `rounds`
/// timed ones) so that the machine's slow drifts reach every shape alike. The fastest rather
/// than the median step: other work on a shared machine only ever slows a step down.
fn fastest_steps(names: &[&str], rounds: usize) -> Result<Vec<(f64, f64)>> {
    use nuwa_train::bench::{bench_shape, TrainBench};
    let device = burn::tensor::Device::default();
    let mut benches = names
        .iter()
        .map(|n| TrainBench::new(&bench_shape(n)?, &device))
        .collect::<Result<Vec<_>>>()?;
    let mut fastest = vec![f64::INFINITY; names.len()];
    let bar = indicatif::ProgressBar::new(((rounds + 1) * names.len()) as u64)
        .with_message("timing training steps");
    for round in 0..=rounds {
        for (bench, best) in benches.iter_mut().zip(&mut fastest) {
            let seconds: f64 = bench.step()?.iter().sum();
            if round > 0 {
                *best = best.min(seconds);
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(benches
        .iter()
        .zip(fastest)
        .map(|(b, s)| (b.flops_per_step, s))
        .collect())
}

/// Replaces this machine's calibration points with the measured (FLOPs, seconds) steps.
fn record_calibration(cal: &mut Calibration, steps: &[(f64, f64)], quiet: bool) {
    let peak = nuwa_core::hardware::cpu_peak_flops();
    cal.devices.remove(LOCAL_CPU);
    for (name, &(flops, seconds)) in CALIBRATION_SHAPES.iter().zip(steps) {
        let mfu = flops / seconds / peak;
        if !quiet {
            println!(
                "shape {name}: {flops:.2e} FLOPs per step, fastest step {seconds:.3} s, MFU {:.1}%",
                mfu * 100.0
            );
        }
        cal.add(
            LOCAL_CPU,
            Point {
                flops_per_step: flops,
                mfu,
            },
        );
    }
}

fn load_or_new(path: &Path) -> Result<Calibration> {
    if path.exists() {
        Calibration::load(path)
    } else {
        Ok(Calibration::default())
    }
}

fn calibrate(a: CalibrateArgs) -> Result<()> {
    let mut cal = load_or_new(&a.out)?;
    let steps = fastest_steps(&CALIBRATION_SHAPES, a.steps.max(1))?;
    record_calibration(&mut cal, &steps, false);
    cal.save(&a.out)?;
    println!("calibration saved in {}", a.out.display());
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    use nuwa_train::bench::bench_shape;
    let shape = bench_shape(&a.shape)?;
    // With --calibrate the calibration shapes and this one are timed in turn, in one run.
    let (cal, measured) = if a.calibrate {
        let mut names = CALIBRATION_SHAPES.to_vec();
        names.push(&a.shape);
        let steps = fastest_steps(&names, a.steps.max(1))?;
        let mut cal = load_or_new(&a.calibration)?;
        record_calibration(&mut cal, &steps, a.json);
        cal.save(&a.calibration)?;
        (cal, steps[CALIBRATION_SHAPES.len()].1)
    } else {
        let cal = Calibration::load(&a.calibration)?;
        (cal, fastest_steps(&[&a.shape], a.steps.max(1))?[0].1)
    };
    let w = Workload {
        model: shape.model.clone(),
        seq_len: shape.seq_len,
        global_batch: shape.batch_size,
        tokens: (shape.batch_size * shape.seq_len) as f64,
    };
    let step_flops = (shape.batch_size * shape.seq_len) as f64 * w.flops_per_token();
    let eff = cal.efficiency(LOCAL_CPU, step_flops).ok_or_else(|| {
        anyhow!(
            "{}: no {LOCAL_CPU} measurements; run `nuwa plan calibrate` first",
            a.calibration.display()
        )
    })?;
    let cpu = local_cpu();
    let available = nuwa_plan::Available {
        name: LOCAL_CPU.into(),
        count: 1,
        peak_flops: cpu.bf16_tflops.unwrap_or(0.0) * 1e12,
        memory_bytes: cpu.memory_gb.unwrap_or(0.0) * 1e9,
        price_per_hour: a.price_per_hour,
        domestic: false,
        intra_node_bytes_s: 1e11,
        inter_node_bytes_s: 1e11,
        per_node: 1,
        assumed: vec![],
    };
    let layout = Layout {
        tp: 1,
        pp: 1,
        ep: 1,
        micro_batch: shape.batch_size,
        recompute: false,
    };
    let predicted = cost::step_time(&w, &available, &layout, eff, shape.batch_size, 1, 1e11).total;
    let error = (predicted - measured) / measured;
    let hour = |s: f64| s / 3600.0 * a.price_per_hour;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"shape": a.shape, "efficiency": eff, "predicted_step_s": predicted,
                "measured_step_s": measured, "relative_error": error,
                "predicted_cost_per_step": hour(predicted), "measured_cost_per_step": hour(measured)})
        );
    } else {
        println!(
            "shape {}: predicted {:.3} s/step (efficiency {:.1}% from calibration), measured \
             {:.3} s/step: error {:+.1}%",
            a.shape,
            predicted,
            eff * 100.0,
            measured,
            error * 100.0
        );
        if a.price_per_hour > 0.0 {
            println!(
                "cost per step: predicted {:.6}, measured {:.6}",
                hour(predicted),
                hour(measured)
            );
        }
    }
    Ok(())
}
