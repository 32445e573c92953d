//! `nuwa launch`: runs `mpirun -np N nuwa train --dist mpi ...` and, when the job fails (a rank
//! killed, a hang caught by the collective timeout), restarts it from the run's last checkpoint
//! on the ranks that are left — the data cursor is in the checkpoint, so no sample is skipped
//! or seen twice.

use anyhow::{anyhow, bail, Result};
use nuwa_run::checkpoint::list_checkpoints;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct LaunchOptions {
    pub np: usize,
    /// Never restart on fewer ranks than this.
    pub min_np: usize,
    pub max_restarts: usize,
    /// Restart on as many ranks as before (the failed device came back) instead of one fewer.
    pub keep_size: bool,
    /// The `nuwa` executable the ranks run.
    pub exe: PathBuf,
    /// `nuwa train` arguments; must contain `--run-dir DIR` (or `--resume DIR`).
    pub train_args: Vec<String>,
    /// Extra arguments for mpirun (before `-np`).
    pub mpirun_args: Vec<String>,
}

/// The run folder named by `--run-dir` or `--resume`.
fn run_dir(args: &[String]) -> Option<PathBuf> {
    args.windows(2)
        .find(|w| w[0] == "--run-dir" || w[0] == "--resume")
        .map(|w| PathBuf::from(&w[1]))
}

/// Arguments for a restart: resume the run, and drop test-only fault injection so the fault
/// that ended the first attempt does not fire again.
fn restart_args(args: &[String], run: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--run-dir" | "--resume" | "--fault-kill-at" | "--fault-hang-at" => {
                it.next();
            }
            _ => out.push(a.clone()),
        }
    }
    if !list_checkpoints(run).is_empty() {
        out.extend(["--resume".to_string(), run.display().to_string()]);
    } else {
        out.extend(["--run-dir".to_string(), run.display().to_string()]);
    }
    out
}

/// The expert-parallel group size for a restart on `np` ranks: kept when it still divides
/// them, else the largest divisor of `np` below it — or, when that is 1, all `np` ranks as
/// one group, so the experts stay split. The checkpoint holds every expert whole, so any
/// group size loads it.
pub fn ep_for(np: usize, ep: usize) -> usize {
    if ep <= 1 || np.is_multiple_of(ep) {
        return ep.min(np).max(1);
    }
    match (1..ep).rev().find(|d| np.is_multiple_of(*d)) {
        Some(1) | None => np,
        Some(d) => d,
    }
}

/// Pipeline stages for a restart on `np` ranks: kept when they still divide them, else the
/// largest number below that does (the checkpoint loads on any stages).
pub fn pp_for(np: usize, pp: usize) -> usize {
    (1..=pp.min(np).max(1))
        .rev()
        .find(|d| np.is_multiple_of(*d))
        .unwrap_or(1)
}

/// `args` with `flag` (or `flag=`) re-shaped for `np` ranks by `resize`.
fn with_resized(
    args: &[String],
    flag: &str,
    np: usize,
    resize: fn(usize, usize) -> usize,
) -> Vec<String> {
    let mut out = args.to_vec();
    let inline_prefix = format!("{flag}=");
    for i in 0..out.len() {
        let value = match out[i].strip_prefix(&inline_prefix) {
            Some(v) => Some((i, v.to_string(), true)),
            None if out[i] == flag => out.get(i + 1).map(|v| (i + 1, v.clone(), false)),
            None => None,
        };
        if let Some((at, v, inline)) = value {
            if let Ok(n) = v.parse::<usize>() {
                let new = resize(np, n).to_string();
                out[at] = if inline {
                    format!("{inline_prefix}{new}")
                } else {
                    new
                };
            }
        }
    }
    out
}

/// `args` with `--pp` and `--ep` set for `np` ranks: stages first, then expert groups within
/// a stage's ranks.
fn with_ep_for(args: &[String], np: usize) -> Vec<String> {
    let staged = with_resized(args, "--pp", np, pp_for);
    let pp = staged
        .windows(2)
        .find(|w| w[0] == "--pp")
        .and_then(|w| w[1].parse::<usize>().ok())
        .or_else(|| {
            staged
                .iter()
                .find_map(|a| a.strip_prefix("--pp=")?.parse().ok())
        })
        .unwrap_or(1);
    with_resized(&staged, "--ep", np / pp.max(1), ep_for)
}

fn last_step(run: &Path) -> Option<u64> {
    list_checkpoints(run).last().map(|c| c.0)
}

/// Runs the job, restarting it after failures; returns the number of restarts it took.
pub fn launch(opts: &LaunchOptions) -> Result<usize> {
    if opts.np == 0 || opts.min_np == 0 || opts.min_np > opts.np {
        bail!(
            "--np {} / --min-np {}: need 1 <= min-np <= np",
            opts.np,
            opts.min_np
        );
    }
    let run = run_dir(&opts.train_args).ok_or_else(|| {
        anyhow!("launch needs --run-dir DIR (or --resume DIR) in the train arguments")
    })?;
    let mut np = opts.np;
    let mut args = opts.train_args.clone();
    orphans::adopt();
    for attempt in 0..=opts.max_restarts {
        let mut cmd = Command::new("mpirun");
        cmd.args(&opts.mpirun_args)
            .args(["--oversubscribe", "-np", &np.to_string()])
            .arg(&opts.exe)
            .args(["train", "--dist", "mpi"])
            .args(&args)
            // Containers and CI often run as root, which Open MPI refuses without these.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        eprintln!("launch: attempt {} on {np} rank(s)", attempt + 1);
        let status = cmd
            .status()
            .map_err(|e| anyhow!("cannot run mpirun ({e}); install Open MPI (openmpi-bin)"))?;
        // Ranks that outlived their mpirun (killed, say) would go on training into the run
        // folder, holding its lock, beside the restart.
        let reaped = orphans::reap();
        if reaped > 0 {
            eprintln!(
                "launch: stopped {reaped} rank process(es) left running by the failed attempt"
            );
        }
        if status.success() {
            return Ok(attempt);
        }
        if attempt == opts.max_restarts {
            break;
        }
        let next = if opts.keep_size {
            np
        } else {
            (np - 1).max(opts.min_np)
        };
        eprintln!(
            "launch: the job failed ({status}); restarting from checkpoint step {} on {next} rank(s)",
            last_step(&run).map_or("none (from scratch)".into(), |s| s.to_string())
        );
        np = next;
        args = with_ep_for(&restart_args(&opts.train_args, &run), np);
    }
    bail!(
        "the job still failed after {} restart(s); the last good checkpoint is kept in {}",
        opts.max_restarts,
        run.display()
    )
}

/// Rank processes that outlive their mpirun. Open MPI puts each rank in a process group of
/// its own, so they cannot be stopped as mpirun's group; instead the launcher becomes a child
/// subreaper (Linux): ranks orphaned by a dead mpirun become its children, and are stopped
/// before the next attempt.
mod orphans {
    /// Makes orphaned descendants this process's children (Linux; elsewhere nothing).
    pub fn adopt() {
        #[cfg(target_os = "linux")]
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer and touches no memory.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }

    /// How long ranks left behind get to exit on their own (one finishing the checkpoint an
    /// interrupt asked for, say) before they are killed.
    pub const GRACE: std::time::Duration = std::time::Duration::from_secs(5);

    /// Waits up to [`GRACE`] for every child left (mpirun itself has been waited for) to exit,
    /// then kills and waits for the rest: returns how many had to be killed.
    pub fn reap() -> usize {
        reap_within(GRACE)
    }

    fn reap_within(grace: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + grace;
        let mut left = children();
        while !left.is_empty() && std::time::Instant::now() < deadline {
            // SAFETY: waitpid on our own children with WNOHANG writes nothing (null status).
            left.retain(|&pid| unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) == 0
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for &pid in &left {
            // SAFETY: plain system calls on a child's pid, which stays ours until waited for.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        left.len()
    }

    /// This process's children, from /proc (field 4 of `stat`, after the parenthesised name).
    fn children() -> Vec<libc::pid_t> {
        let me = std::process::id() as libc::pid_t;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
            .filter(|&pid| parent_of(pid) == Some(me))
            .collect()
    }

    fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_name = &stat[stat.rfind(')')? + 1..];
        after_name.split_whitespace().nth(1)?.parse().ok()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_child_left_running_is_stopped() {
            super::adopt();
            // Not waited for here: `reap` does.
            let pid = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .map(|child| child.id() as libc::pid_t)
                .unwrap();
            assert_eq!(
                super::parent_of(pid),
                Some(std::process::id() as libc::pid_t)
            );
            assert!(super::reap_within(std::time::Duration::ZERO) >= 1);
            assert_eq!(super::parent_of(pid), None, "killed and waited for");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_resume_and_drop_the_fault() {
        let args: Vec<String> = [
            "--steps",
            "9",
            "--run-dir",
            "/nowhere/run",
            "--fault-kill-at",
            "3:1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(run_dir(&args), Some(PathBuf::from("/nowhere/run")));
        let again = restart_args(&args, Path::new("/nowhere/run"));
        assert_eq!(again, ["--steps", "9", "--run-dir", "/nowhere/run"]);
    }

    #[test]
    fn expert_groups_shrink_to_divide_the_ranks_left() {
        assert_eq!(ep_for(4, 2), 2);
        assert_eq!(ep_for(3, 2), 3, "all three ranks as one group");
        assert_eq!(ep_for(6, 4), 3);
        assert_eq!(ep_for(2, 4), 2);
        assert_eq!(ep_for(5, 1), 1);
        let args: Vec<String> = ["--ep", "2", "--steps", "3"].map(String::from).to_vec();
        assert_eq!(with_ep_for(&args, 3)[1], "3");
        assert_eq!(with_ep_for(&["--ep=4".to_string()], 2)[0], "--ep=2");
        assert_eq!(pp_for(3, 2), 1);
        assert_eq!(pp_for(6, 4), 3);
        let args: Vec<String> = ["--pp", "2", "--ep", "2"].map(String::from).to_vec();
        assert_eq!(with_ep_for(&args, 6), ["--pp", "2", "--ep", "3"]);
    }
}
