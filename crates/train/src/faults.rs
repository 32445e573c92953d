//! Test-only fault injection (cargo feature `fault-injection`, which the multi-process tests
//! and `bench/dist_bench.py` build with): a rank that dies, hangs or runs slower than it
//! could, at a chosen step. Production builds carry none of it.

use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// (step, rank): that rank kills itself with SIGKILL as the step starts.
    pub kill_at: Option<(u64, usize)>,
    /// (step, rank): that rank stops answering (sleeps before the collectives), as a hung
    /// device would.
    pub hang_at: Option<(u64, usize)>,
    /// This rank sleeps so it runs `throttle`× slower than it could...
    pub throttle: f64,
    /// ...from this step on (a device that slows down mid-run).
    pub throttle_from: u64,
}

impl Faults {
    /// Step `step` (1-based) starts on `rank`.
    pub fn begin_step(&self, step: u64, rank: usize) {
        if self.kill_at == Some((step, rank)) {
            kill_self();
        }
        self.pace_step(step);
    }

    /// Step `step` starts computing: a throttled rank computes slower from `throttle_from` on
    /// (every stretch of its compute between collectives, see `nuwa_core::comm::pace`).
    pub fn pace_step(&self, step: u64) {
        let slow = self.throttle > 1.0 && step >= self.throttle_from;
        nuwa_core::comm::pace::set_slowdown(if slow { self.throttle } else { 1.0 });
    }

    /// This rank computed its part of `step`: a hung device stops here.
    pub fn after_compute(&self, step: u64, rank: usize) {
        if self.hang_at == Some((step, rank)) {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// This process dies the way `kill -9` kills it.
fn kill_self() {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status();
    // If `kill` is missing, abort is the nearest thing.
    std::process::abort();
}
