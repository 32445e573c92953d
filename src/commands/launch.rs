//! `nuwa launch`: run `nuwa train --dist mpi` under mpirun, restarting from the last
//! checkpoint when a rank fails.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks (processes) to start (default with --plan: the plan's).
    #[arg(long)]
    np: Option<usize>,
    /// Run a plan file from `nuwa plan --out`: checked before any rank starts, then passed to
    /// every rank as `nuwa train` flags (so a restart on fewer ranks can re-shape the layout).
    #[arg(long)]
    plan: Option<std::path::PathBuf>,
    /// Fewest ranks a restart may use.
    #[arg(long, default_value_t = 1)]
    min_np: usize,
    #[arg(long, default_value_t = 3)]
    max_restarts: usize,
    /// Restart on as many ranks as before (the failed device came back).
    #[arg(long)]
    keep_size: bool,
    /// Extra mpirun arguments, e.g. `--mpirun-arg=-x --mpirun-arg=RAYON_NUM_THREADS=1`.
    #[arg(long = "mpirun-arg", allow_hyphen_values = true)]
    mpirun_args: Vec<String>,
    /// `nuwa train` arguments (after `--`); must include --run-dir DIR.
    #[arg(last = true, required = true)]
    train_args: Vec<String>,
}

pub fn launch(a: LaunchArgs) -> Result<()> {
    let mut train_args = a.train_args;
    let np = match &a.plan {
        Some(path) => {
            let plan = super::plan_run::load_checked(path)?;
            let split_flag = train_args.iter().enumerate().find_map(|(i, a)| {
                match a.strip_prefix("--ep-split=") {
                    Some(v) => Some(v.to_string()),
                    None => (a == "--ep-split").then(|| train_args.get(i + 1).cloned())?,
                }
            });
            if let (Some(given), Some(split)) = (&split_flag, plan.layout.expert_split) {
                if given.parse() != Ok(split) {
                    bail!(
                        "--ep-split {given}: {}: the plan says {split}; leave the flag out to \
                         run the plan",
                        path.display()
                    );
                }
            }
            let split = split_flag
                .as_deref()
                .filter(|&s| s == "width" || s == "shared");
            if let Some(split) = split.filter(|_| plan.layout.expert_placement.is_some()) {
                bail!(
                    "--ep-split {split}: {}: its layout.expert_placement counts whole experts per \
                     rank, none shared; drop one of the two",
                    path.display()
                );
            }
            if let Some(np) = a.np.filter(|&n| n != plan.ranks()) {
                bail!(
                    "--np {np}: {}: the plan is for {} rank(s) (its [[part]] counts)",
                    path.display(),
                    plan.ranks()
                );
            }
            train_args.extend(super::plan_run::train_flags(&plan));
            // Each rank's device, and the plan's fixed stage layers and expert placement.
            train_args.extend(["--launched-plan".to_string(), path.display().to_string()]);
            // How expert groups split the experts holds on any number of ranks, restarts too.
            if let (None, Some(split)) = (&split_flag, plan.layout.expert_split) {
                train_args.extend(["--ep-split".to_string(), split.to_string()]);
            }
            plan.ranks()
        }
        None => {
            a.np.ok_or_else(|| anyhow!("--np N (ranks to start) is required without --plan"))?
        }
    };
    let restarts = nuwa_dist::launch(&nuwa_dist::LaunchOptions {
        np,
        min_np: a.min_np,
        max_restarts: a.max_restarts,
        keep_size: a.keep_size,
        exe: std::env::current_exe().context("locating the nuwa executable")?,
        train_args,
        mpirun_args: a.mpirun_args,
    })?;
    println!("launch: the job finished after {restarts} restart(s)");
    Ok(())
}
