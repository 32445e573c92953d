//! `nuwa plan`: the cost planner's command line (search, calibrate, verify, the Ant example).

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use nuwa_model::ModelConfig;
use nuwa_plan::verify::{
    load_or_new, local_cpu, record_calibration, BenchWorkload, StepTimer, CALIBRATION_SHAPES,
};
use nuwa_plan::{
    parse_count, parse_days, report, search, Calibration, Catalogue, Constraints, Inventory,
    Objective, Workload, DEFAULT_EFFICIENCY,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    /// Run a plan nuwa can run here and compare its predicted and measured step time; or,
    /// with --plan and --run, compare a plan file's prediction with a finished run of it.
    Verify(VerifyArgs),
    /// Predict a plan file's step time and memory per device from the cost model and the
    /// calibration (and, with --write, store the prediction in the file).
    Predict(PredictArgs),
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
    #[arg(long, default_value = "ling-lite")]
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
    /// What the best plan minimises.
    #[arg(long, value_enum, default_value_t = ObjectiveArg::Cost)]
    objective: ObjectiveArg,
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
    /// Write the best plan as a plan file, for `nuwa launch --plan FILE -- ...` to run.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `--objective`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ObjectiveArg {
    /// Total cost.
    Cost,
    /// Days to finish.
    Time,
}

#[derive(Args)]
struct CalibrateArgs {
    /// Where to store the measurements.
    #[arg(long, default_value = DEFAULT_CALIBRATION)]
    out: PathBuf,
    /// Timed steps per shape (the fastest counts).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Calibrate from a finished one-process run instead (the median step of its second
    /// half): this machine's efficiency on that run's own model and batch, replacing the
    /// file's points.
    #[arg(long)]
    from_run: Option<PathBuf>,
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    plan: PathBuf,
    /// Calibration from `nuwa plan calibrate` (default nuwa-calibration.json if present).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Write the prediction into the plan file's [predicted] table.
    #[arg(long)]
    write: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// A plan file (with --run): its prediction against the run's measured steps.
    #[arg(long, requires = "run")]
    plan: Option<PathBuf>,
    /// A finished run of --plan: its metrics.jsonl.
    #[arg(long, requires = "plan")]
    run: Option<PathBuf>,
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
        Some(PlanCommand::Verify(v)) => match (&v.plan, &v.run) {
            (Some(plan), Some(run)) => verify_run(plan, run, &v.calibration, v.json),
            _ => verify(v),
        },
        Some(PlanCommand::Predict(p)) => predict(p),
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

fn catalogue(extra: Option<&Path>) -> Result<Catalogue> {
    Catalogue::load(extra, local_cpu())
}

fn model(name: &str) -> Result<ModelConfig> {
    nuwa_config::model_by_name(name).map_err(|e| anyhow!("--model {e}"))
}

/// `--efficiency NAME=MFU`, each checked.
fn efficiency_overrides(given: &[String]) -> Result<BTreeMap<String, f64>> {
    let mut overrides = BTreeMap::new();
    for e in given {
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
    Ok(overrides)
}

/// `--calibration`, or the default file when it exists, or none.
fn calibration(path: Option<&Path>) -> Result<Calibration> {
    match path {
        Some(p) => Calibration::load(p),
        None if Path::new(DEFAULT_CALIBRATION).exists() => {
            Calibration::load(Path::new(DEFAULT_CALIBRATION))
        }
        None => Ok(Calibration::default()),
    }
}

/// The search's constraints from the flags, each checked.
fn constraints(a: &SearchArgs) -> Result<Constraints> {
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
    Ok(Constraints {
        deadline_days: deadline,
        budget: a.budget,
        domestic_share: a.domestic_share,
    })
}

fn plan_search(a: SearchArgs) -> Result<()> {
    let inv_path = a
        .inventory
        .clone()
        .ok_or_else(|| anyhow!("--inventory FILE is required (the devices you can get)"))?;
    let tokens = parse_count(&a.tokens).map_err(|e| anyhow!("--tokens: {e}"))?;
    let constraints = constraints(&a)?;
    if a.seq_len == 0 || a.global_batch == 0 {
        bail!("--seq-len and --global-batch must be positive");
    }
    let objective = match a.objective {
        ObjectiveArg::Cost => Objective::Cost,
        ObjectiveArg::Time => Objective::Time,
    };
    let inventory = Inventory::load(&inv_path)?;
    let cat = catalogue(a.catalogue.catalogue.as_deref())?;
    let devices = inventory.resolve(&cat, &inv_path.display().to_string())?;
    let calibration = calibration(a.calibration.as_deref())?;
    let overrides = efficiency_overrides(&a.efficiency)?;
    let w = Workload {
        model: model(&a.model)?,
        seq_len: a.seq_len,
        global_batch: a.global_batch,
        tokens,
    };
    let step_flops = (a.global_batch * a.seq_len) as f64 * w.flops_per_token();
    let efficiency = |name: &str| -> (f64, &str) {
        match overrides.get(name) {
            Some(&e) => (e, "given"),
            None => match calibration.efficiency(name, step_flops) {
                Some(e) => (e, "calibrated"),
                None => (DEFAULT_EFFICIENCY, "default, uncalibrated"),
            },
        }
    };
    let mut all = search::enumerate(&w, &devices, &|n| efficiency(n).0, &constraints);
    search::rank(&mut all, objective);
    let (feasible, rejected): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|p| p.violations.is_empty());
    for d in &devices {
        let (eff, how) = efficiency(&d.name);
        let assumed = match d.assumed.is_empty() {
            true => String::new(),
            false => format!("; assumed: {}", d.assumed.join(", ")),
        };
        let count = d.count;
        println!(
            "{}: {count} available, efficiency {:.0}% ({how}){assumed}",
            d.name,
            eff * 100.0
        );
    }
    let Some(best) = feasible.first() else {
        let why = search::explain_infeasible(&rejected, &constraints);
        bail!(
            "no feasible plan for {} on {} tokens: {why}",
            a.model,
            a.tokens
        );
    };
    let top: Vec<&nuwa_plan::Plan> = feasible.iter().take(a.top).collect();
    let by = format!("{:?}", a.objective).to_lowercase();
    println!(
        "\n{} feasible plans for {} on {} tokens; the best by {by}:\n",
        feasible.len(),
        a.model,
        a.tokens
    );
    print!("{}", report::table(&top, &inventory.currency));
    let tempting = search::tempting(&rejected, best, objective, 3);
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
    if let Some(path) = &a.out {
        let mut file = nuwa_plan::PlanFile::of(best, &a.model, a.seq_len, a.global_batch);
        if let Some(p) = &mut file.predicted {
            let how: Vec<String> = best
                .parts
                .iter()
                .map(|part| {
                    let (eff, how) = efficiency(&part.device);
                    format!("{} {:.0}% ({how})", part.device, eff * 100.0)
                })
                .collect();
            p.efficiency = Some(how.join(", "));
        }
        file.save(path)?;
        println!(
            "best plan written to {} (run it: nuwa launch --plan {} -- --run-dir RUN)",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// The trainer's benchmark steps, timed for the planner.
struct TrainTimer;

impl StepTimer for TrainTimer {
    fn workload(&self, shape: &str) -> Result<BenchWorkload> {
        let s = nuwa_train::bench::bench_shape(shape)?;
        Ok(BenchWorkload {
            model: s.model,
            seq_len: s.seq_len,
            batch_size: s.batch_size,
        })
    }

    fn fastest_steps(&self, names: &[&str], rounds: usize) -> Result<Vec<(f64, f64)>> {
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
}

/// A run's training FLOPs per step and median step seconds (second half of its steps).
fn measured_run(run: &Path) -> Result<(f64, f64)> {
    let cfg_path = run.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| anyhow!("{}: cannot read ({e})", cfg_path.display()))?;
    let cfg: nuwa_run::RunConfig =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", cfg_path.display()))?;
    let t = &cfg.train;
    let tokens = (t.batch_size * t.grad_accum * t.seq_len) as f64;
    let flops = tokens * cfg.model.counts(t.seq_len).train_flops_per_token;
    let file = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&file)
        .map_err(|e| anyhow!("{}: cannot read ({e})", file.display()))?;
    let mut steps: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["step_seconds"].as_f64())
        .collect();
    if steps.len() < 2 {
        bail!("{}: fewer than 2 steps to measure", file.display());
    }
    let mut timed = steps.split_off(steps.len() / 2);
    timed.sort_by(f64::total_cmp);
    Ok((flops, timed[timed.len() / 2]))
}

fn calibrate(a: CalibrateArgs) -> Result<()> {
    if let Some(run) = &a.from_run {
        let (flops, seconds) = measured_run(run)?;
        let mfu = flops / seconds / nuwa_core::hardware::cpu_peak_flops();
        let mut cal = nuwa_plan::Calibration::default();
        cal.add(
            nuwa_plan::verify::LOCAL_CPU,
            nuwa_plan::Point {
                flops_per_step: flops,
                mfu,
            },
        );
        cal.save(&a.out)?;
        println!(
            "{}: {flops:.2e} FLOPs per step, median step {seconds:.3} s, MFU {:.1}%; saved in {}",
            run.display(),
            mfu * 100.0,
            a.out.display()
        );
        return Ok(());
    }
    let mut cal = load_or_new(&a.out)?;
    let steps = TrainTimer.fastest_steps(&CALIBRATION_SHAPES, a.steps.max(1))?;
    for line in record_calibration(&mut cal, &steps) {
        println!("{line}");
    }
    cal.save(&a.out)?;
    println!("calibration saved in {}", a.out.display());
    Ok(())
}

/// The cost model's prediction for a plan file, with the efficiency of the calibration.
fn predicted(
    path: &Path,
    calibration_path: Option<&Path>,
) -> Result<(nuwa_plan::planfile::Predicted, String)> {
    let plan = nuwa_plan::PlanFile::load(path)?;
    let model = model(&plan.model)?;
    let cal = calibration(calibration_path)?;
    let cat = catalogue(None)?;
    // Which devices the calibration does not know: the prediction is only as good as the
    // default efficiency there, and the user should be told so.
    let mut uncalibrated: Vec<String> = Vec::new();
    let eff = |name: &str, flops: f64| cal.efficiency(name, flops).unwrap_or(DEFAULT_EFFICIENCY);
    let predicted = nuwa_plan::planfile::predict(&plan, &model, &cat, &eff)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for part in &plan.parts {
        if cal.efficiency(&part.device, 1.0).is_none() && !uncalibrated.contains(&part.device) {
            uncalibrated.push(part.device.clone());
        }
    }
    let source = match (uncalibrated.is_empty(), calibration_path) {
        (true, Some(c)) => format!("calibrated ({})", c.display()),
        (true, None) => format!("calibrated ({DEFAULT_CALIBRATION})"),
        (false, _) => format!(
            "UNCALIBRATED for {}: the default efficiency {:.0}%; calibrate this machine \
             (`nuwa plan calibrate`, or `--calibration FILE`) for a prediction worth comparing",
            uncalibrated.join(", "),
            DEFAULT_EFFICIENCY * 100.0
        ),
    };
    Ok((predicted, source))
}

fn predict(a: PredictArgs) -> Result<()> {
    let (p, source) = predicted(&a.plan, a.calibration.as_deref())?;
    let mem: Vec<String> = p
        .memory_bytes
        .iter()
        .map(|b| format!("{:.2} GB", b / 1e9))
        .collect();
    println!(
        "{}: predicted {:.4} s per step; memory per device of each part: {} ({source})",
        a.plan.display(),
        p.step_seconds,
        mem.join(", ")
    );
    if a.write {
        let mut plan = nuwa_plan::PlanFile::load(&a.plan)?;
        plan.predicted = Some(nuwa_plan::planfile::Predicted {
            efficiency: Some(source),
            ..p
        });
        plan.save(&a.plan)?;
    }
    Ok(())
}

/// A plan file's prediction against a finished run of it: the median step of the run's
/// second half, and each rank's peak memory.
fn verify_run(plan_path: &Path, run: &Path, calibration: &Path, json: bool) -> Result<()> {
    let plan = nuwa_plan::PlanFile::load(plan_path)?;
    // Priced now with `--calibration` when it is given, else the plan's own prediction
    // (`nuwa plan --out`, `nuwa plan predict --write`), else priced with the default file.
    let given = calibration != Path::new(DEFAULT_CALIBRATION);
    if given && !calibration.exists() {
        bail!("--calibration {}: no such file", calibration.display());
    }
    let (predicted, source) = match (&plan.predicted, given) {
        (Some(p), false) => {
            let how = p
                .efficiency
                .as_deref()
                .unwrap_or("its efficiency not recorded");
            let mut stored = format!("the plan's [predicted] ({how})");
            if how.contains("uncalibrated") {
                stored.push_str(
                    ": UNCALIBRATED; calibrate this machine (`nuwa plan calibrate`) and re-price \
                     with `--calibration FILE`",
                );
            }
            (p.clone(), stored)
        }
        _ => predicted(plan_path, given.then_some(calibration))?,
    };
    let file = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&file)
        .map_err(|e| anyhow!("{}: cannot read ({e})", file.display()))?;
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if records.len() < 2 {
        bail!("{}: fewer than 2 steps to measure", file.display());
    }
    let timed = &records[records.len() / 2..];
    let mut steps: Vec<f64> = timed
        .iter()
        .filter_map(|r| r["step_seconds"].as_f64())
        .collect();
    steps.sort_by(f64::total_cmp);
    let measured = steps[steps.len() / 2];
    // Each rank's peak, and what it held before its model (program, MPI, data): the planner
    // models only what the model adds (weights, gradients, optimiser state, activations).
    let per_rank = |key: &str| -> Vec<f64> {
        let ranks = timed.last().and_then(|r| r["ranks"].as_array());
        ranks.map_or_else(Vec::new, |ranks| {
            ranks
                .iter()
                .map(|r| r[key].as_f64().unwrap_or(0.0))
                .collect()
        })
    };
    let (rss, before) = (
        per_rank("peak_rss_bytes"),
        per_rank("rss_before_model_bytes"),
    );
    let model_bytes: Vec<f64> = rss
        .iter()
        .zip(&before)
        .map(|(peak, before)| (peak - before).max(0.0))
        .collect();
    let error = (predicted.step_seconds - measured) / measured;
    if json {
        println!(
            "{}",
            serde_json::json!({"predicted_step_s": predicted.step_seconds,
                "measured_step_s": measured, "relative_error": error,
                "prediction_from": source,
                "predicted_memory_bytes_per_part": predicted.memory_bytes,
                "measured_peak_rss_bytes_per_rank": rss,
                "measured_rss_before_model_bytes_per_rank": before,
                "measured_model_bytes_per_rank": model_bytes})
        );
        return Ok(());
    }
    println!(
        "{}: predicted {:.4} s/step, measured {measured:.4} s/step (median of steps {}-{}): \
         error {:+.1}%",
        plan_path.display(),
        predicted.step_seconds,
        records.len() - timed.len() + 1,
        records.len(),
        error * 100.0
    );
    println!("prediction: {source}");
    for (r, bytes) in rss.iter().enumerate() {
        let part = plan.device_of(r);
        let index = plan
            .parts
            .iter()
            .position(|p| p.device == part)
            .unwrap_or(0);
        let want = predicted.memory_bytes.get(index).copied().unwrap_or(0.0);
        let gb = |b: f64| b / 1e9;
        match before.get(r).copied().filter(|&b| b > 0.0) {
            Some(b) => println!(
                "rank {r} ({part}): peak RSS {:.3} GB = {:.3} GB before the model + {:.3} GB \
                 the model took; planner's memory model {:.3} GB",
                gb(*bytes),
                gb(b),
                gb((bytes - b).max(0.0)),
                gb(want)
            ),
            None => println!(
                "rank {r} ({part}): peak RSS {:.3} GB, planner's memory model {:.3} GB",
                gb(*bytes),
                gb(want)
            ),
        }
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let (v, lines) =
        nuwa_plan::verify::verify(&TrainTimer, &a.shape, &a.calibration, a.calibrate, a.steps)?;
    let hour = |s: f64| s / 3600.0 * a.price_per_hour;
    let (predicted, measured) = (v.predicted_step_s, v.measured_step_s);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"shape": v.shape, "efficiency": v.efficiency,
                "predicted_step_s": predicted, "measured_step_s": measured,
                "relative_error": v.relative_error,
                "predicted_cost_per_step": hour(predicted), "measured_cost_per_step": hour(measured)})
        );
        return Ok(());
    }
    for line in lines {
        println!("{line}");
    }
    println!(
        "shape {}: predicted {predicted:.3} s/step (efficiency {:.1}% from calibration), measured \
         {measured:.3} s/step: error {:+.1}%",
        v.shape,
        v.efficiency * 100.0,
        v.relative_error * 100.0
    );
    if a.price_per_hour > 0.0 {
        println!(
            "cost per step: predicted {:.6}, measured {:.6}",
            hour(predicted),
            hour(measured)
        );
    }
    Ok(())
}
