//! `nuwa launch`: run `nuwa train --dist mpi` under mpirun, restarting from the last
//! checkpoint when a rank fails.

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks (processes) to start.
    #[arg(long)]
    np: usize,
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
    let restarts = nuwa_dist::launch(&nuwa_dist::LaunchOptions {
        np: a.np,
        min_np: a.min_np,
        max_restarts: a.max_restarts,
        keep_size: a.keep_size,
        exe: std::env::current_exe().context("locating the nuwa executable")?,
        train_args: a.train_args,
        mpirun_args: a.mpirun_args,
    })?;
    println!("launch: the job finished after {restarts} restart(s)");
    Ok(())
}
