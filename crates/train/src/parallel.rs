//! Data parallelism over unequal devices: the collective interface the trainer needs, the
//! host-memory gradient all-reduce, the throughput balancer and the straggler detector.
//!
//! The communicator itself (MPI) lives in `nuwa-dist`; the trainer only sees [`Collective`], so
//! the single-process path and every test of the math run without MPI.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use nuwa_core::proportional_shares;
use std::collections::HashSet;
use std::time::Duration;

pub use nuwa_core::{Collective, SoloCollective};

/// How one rank takes part in a data-parallel run.
pub struct DistOptions {
    pub comm: std::sync::Arc<dyn Collective>,
    /// Each rank's device, by rank, as the metrics name it.
    pub devices: Vec<String>,
    /// Re-balance the shares of the global batch every this many steps (and after the
    /// profiling step, the second: the first is warm-up); 0 keeps the equal split.
    pub rebalance_every: u64,
    /// Most sequences per micro-batch each rank may take (its memory bound), by rank.
    pub max_seqs: Vec<Option<usize>>,
    /// Bytes each rank may fill with parameters, gradients and optimiser state (a cluster
    /// file's `memory_gb`; `None`: the host's available memory), by rank: what bounds its
    /// experts and pipeline layers.
    pub memory_bytes: Vec<Option<f64>>,
    /// A rank whose compute time exceeds `straggler_factor` × its predicted time for
    /// `straggler_patience` steps in a row is reported.
    pub straggler_factor: f64,
    pub straggler_patience: u32,
    /// A collective that waits longer than this is taken as a hung or dead peer: the rank
    /// reports it and exits, so the supervisor can restart the job.
    pub collective_timeout: Duration,
    /// Test-only fault injection.
    #[cfg(feature = "fault-injection")]
    pub faults: crate::faults::Faults,
    /// Record a hash of every rank's parameters after each step (costs a host copy).
    pub hash_params: bool,
    /// Ranks per expert-parallel group (1: every rank holds every expert).
    pub ep: usize,
    /// Experts per member of an expert-parallel group, as a plan fixed them (`None`: equal
    /// at first, then sized by the measured speeds).
    pub placement: Option<Vec<usize>>,
    /// How an expert group splits the experts: whole experts, every expert's columns in
    /// proportion to speed, or whole experts with shared boundaries.
    pub ep_split: nuwa_model::expert_parallel::ExpertSplit,
    /// Pipeline stages (1: none).
    pub pp: usize,
    /// Decoder layers per stage, as a plan fixed them (`None`: sized by the measured speeds).
    pub stage_layers: Option<Vec<usize>>,
}

impl DistOptions {
    /// Bytes rank `rank` may fill with parameters, gradients and optimiser state: its cluster
    /// file's, else the host's available memory (`None`: unknown, unbounded).
    pub fn memory_of(&self, rank: usize) -> Option<f64> {
        let declared = self.memory_bytes.get(rank).copied().flatten();
        declared.or_else(|| nuwa_core::hardware::available_memory().map(|b| b as f64))
    }
}

/// Keeps each rank's expected speed (sequences per second of compute) and its share.
///
/// The expected speed is what the current split was planned with: a moving average of the
/// steps in which the rank ran as predicted. A step far slower than predicted is a straggler
/// symptom and does not move the expectation, so a rank that stays slow stays reported; the
/// next re-balance plans with its latest speed instead, and the slowdown is absorbed.
pub struct Balancer {
    pub speeds: Vec<Option<f64>>,
    /// The last measurement of ranks whose last step was flagged slow.
    slow_latest: Vec<Option<f64>>,
    pub shares: Vec<usize>,
}

impl Balancer {
    /// Starts with an equal split (the first step is the profile).
    pub fn new(total: usize, ranks: usize, caps: &[Option<usize>]) -> Self {
        Self {
            speeds: vec![None; ranks],
            slow_latest: vec![None; ranks],
            shares: proportional_shares(total, &vec![1.0; ranks], caps),
        }
    }

    /// Folds in one step's measurements (sequences done and compute seconds, per rank);
    /// `slow` marks ranks that ran far slower than predicted this step.
    pub fn observe(&mut self, seqs: &[f64], seconds: &[f64], slow: &[bool]) {
        for r in 0..self.speeds.len() {
            if seqs[r] > 0.0 && seconds[r] > 0.0 {
                let now = seqs[r] / seconds[r];
                if slow.get(r).copied().unwrap_or(false) {
                    self.slow_latest[r] = Some(now);
                    continue;
                }
                self.slow_latest[r] = None;
                self.speeds[r] = Some(match self.speeds[r] {
                    Some(old) => 0.5 * old + 0.5 * now,
                    None => now,
                });
            }
        }
    }

    /// Predicted compute seconds for `seqs` sequences on rank `r`.
    pub fn predict(&self, r: usize, seqs: usize) -> Option<f64> {
        self.speeds[r].map(|s| seqs as f64 / s)
    }

    /// Re-plans the split: the expected speeds, or the latest for ranks now running slow.
    pub fn rebalance(&mut self, total: usize, caps: &[Option<usize>]) {
        for (s, l) in self.speeds.iter_mut().zip(self.slow_latest.iter_mut()) {
            if let Some(v) = l.take() {
                *s = Some(v);
            }
        }
        let known: Vec<f64> = self.speeds.iter().flatten().copied().collect();
        let fallback = known.iter().sum::<f64>() / known.len().max(1) as f64;
        let speeds: Vec<f64> = self
            .speeds
            .iter()
            .map(|s| s.unwrap_or(fallback.max(1e-9)))
            .collect();
        self.shares = proportional_shares(total, &speeds, caps);
    }
}

/// Names stragglers the same way in every layout: a rank whose compute ran over `factor` ×
/// what was expected of it for `patience` steps in a row. What is expected is the caller's
/// (a balancer's prediction for the rank's share, or a pipeline rank's own usual).
pub struct StragglerWatch {
    factor: f64,
    patience: u32,
    /// Each rank's slow steps in a row.
    slow_steps: Vec<u32>,
}

/// One step's findings.
pub struct StragglerVerdict {
    /// Ranks that ran slow this step.
    pub slow_now: Vec<bool>,
    /// Ranks slow for `patience` steps or more.
    pub stragglers: Vec<usize>,
    /// A line for each rank named a straggler this step for the first time.
    pub notes: Vec<String>,
}

impl StragglerWatch {
    pub fn new(factor: f64, patience: u32) -> Self {
        Self {
            factor,
            patience,
            slow_steps: Vec::new(),
        }
    }

    /// Judges one step's compute seconds against the expected (`None`: nothing expected
    /// yet, never slow). `rank_name` names a rank in notes; `against` says what was expected
    /// ("predicted", "usual").
    pub fn observe(
        &mut self,
        step: u64,
        computes: &[f64],
        expected: &[Option<f64>],
        rank_name: impl Fn(usize) -> String,
        against: &str,
    ) -> StragglerVerdict {
        self.slow_steps.resize(computes.len(), 0);
        let mut verdict = StragglerVerdict {
            slow_now: Vec::with_capacity(computes.len()),
            stragglers: Vec::new(),
            notes: Vec::new(),
        };
        for (r, &compute) in computes.iter().enumerate() {
            let expect = expected.get(r).copied().flatten();
            let slow = expect.is_some_and(|e| compute > self.factor * e);
            verdict.slow_now.push(slow);
            self.slow_steps[r] = if slow { self.slow_steps[r] + 1 } else { 0 };
            if self.slow_steps[r] < self.patience {
                continue;
            }
            verdict.stragglers.push(r);
            if self.slow_steps[r] == self.patience {
                verdict.notes.push(format!(
                    "straggler: {} ran {:.1}x slower than {against} for {} steps (step {step})",
                    rank_name(r),
                    compute / expect.unwrap_or(compute),
                    self.slow_steps[r],
                ));
            }
        }
        verdict
    }
}

struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    /// Parameters left out (expert slices, which differ between ranks).
    skip: &'a HashSet<ParamId>,
    flat: Vec<f32>,
    /// (offset, shape) of each parameter in `flat`, in visiting order.
    layout: Vec<(usize, Vec<usize>)>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.skip.contains(&param.id) {
            return;
        }
        let shape = param.lazy_shape().to_vec();
        let n: usize = shape.iter().product();
        let offset = self.flat.len();
        match self.grads.remove::<D>(param.id) {
            // `iter` converts any element type, so a gradient is never silently zeroed.
            Some(g) => self.flat.extend(g.into_data().iter::<f32>()),
            // A parameter this rank did not touch (an expert no token reached, or no share
            // of the batch) contributes zeros.
            None => self.flat.resize(offset + n, 0.0),
        }
        self.layout.push((offset, shape));
    }
}

struct Unflatten<'a> {
    flat: &'a [f32],
    skip: &'a HashSet<ParamId>,
    layout: std::slice::Iter<'a, (usize, Vec<usize>)>,
    grads: GradientsParams,
    device: Device,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.skip.contains(&param.id) {
            return;
        }
        if let Some((offset, shape)) = self.layout.next() {
            let n: usize = shape.iter().product();
            let data = TensorData::new(self.flat[*offset..offset + n].to_vec(), shape.clone());
            self.grads
                .register::<D>(param.id, Tensor::from_data(data, &self.device));
        }
    }
}

/// Elements per all-reduce: big enough to amortise latency, small enough to bound the
/// extra host memory the MPI library may use.
pub const BUCKET_ELEMENTS: usize = 1 << 22;

/// Sums gradients across ranks through host memory, in fp32 and in fixed-size buckets, so
/// devices of any vendor can take part; the parameters in `skip` keep their own gradients.
/// Returns the seconds spent in the collectives.
pub fn all_reduce_gradients<M: Module>(
    model: &M,
    grads: GradientsParams,
    comm: &dyn Collective,
    skip: &HashSet<ParamId>,
    device: &Device,
) -> (GradientsParams, f64) {
    let mut grads = grads;
    let mut f = Flatten {
        grads: &mut grads,
        skip,
        flat: Vec::new(),
        layout: Vec::new(),
    };
    model.visit(&mut f);
    let (mut flat, layout) = (f.flat, f.layout);
    let started = std::time::Instant::now();
    for bucket in flat.chunks_mut(BUCKET_ELEMENTS) {
        comm.all_reduce_sum(bucket);
    }
    let comm_s = started.elapsed().as_secs_f64();
    let mut u = Unflatten {
        flat: &flat,
        skip,
        layout: layout.iter(),
        // What was skipped stays as it was.
        grads,
        device: device.clone(),
    };
    model.visit(&mut u);
    (u.grads, comm_s)
}

struct Hasher {
    hash: u64,
}

impl ModuleVisitor for Hasher {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        for v in param.val().into_data().iter::<f32>() {
            self.hash = (self.hash ^ v.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// FNV-1a over the bits of every parameter, in module order.
pub fn parameter_hash<M: Module>(model: &M) -> u64 {
    let mut h = Hasher {
        hash: 0xcbf2_9ce4_8422_2325,
    };
    model.visit(&mut h);
    h.hash
}

/// Every rank's 64-bit hash, gathered exactly (as two 32-bit halves per f64).
pub fn gather_hashes(comm: &dyn Collective, hash: u64) -> Vec<u64> {
    let parts = comm.all_gather(&[(hash >> 32) as f64, (hash & 0xffff_ffff) as f64]);
    parts
        .chunks(2)
        .map(|p| ((p[0] as u64) << 32) | p[1] as u64)
        .collect()
}

/// Checks that every rank of the job was started with the same job-wide `settings` (name,
/// value). Ranks that disagree on the layout would wait forever on collectives the others
/// never call; ranks that disagree on a hyper-parameter would train their replicas apart.
/// The error, the same line on every rank, names the first setting that differs.
pub fn check_same_settings(
    comm: &dyn Collective,
    settings: &[(String, String)],
) -> anyhow::Result<()> {
    let text: String = settings
        .iter()
        .map(|(name, value)| format!("{name}\t{value}\n"))
        .collect();
    // Every rank's text, as bytes padded to the longest.
    let lens: Vec<usize> = comm
        .all_gather(&[text.len() as f64])
        .iter()
        .map(|&l| l as usize)
        .collect();
    let longest = lens.iter().copied().max().unwrap_or(0);
    let mut mine: Vec<f64> = text.bytes().map(f64::from).collect();
    mine.resize(longest, 0.0);
    let all = comm.all_gather(&mine);
    let texts: Vec<String> = lens
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            let bytes: Vec<u8> = all[r * longest..r * longest + len]
                .iter()
                .map(|&b| b as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .collect();
    match first_difference(&texts) {
        Some(line) => anyhow::bail!("{line}"),
        None => Ok(()),
    }
}

/// The first setting in which a rank's `name\tvalue` lines differ from rank 0's, said in
/// one line; `None` when every rank has rank 0's.
fn first_difference(texts: &[String]) -> Option<String> {
    let parse = |t: &str| -> Vec<(String, String)> {
        t.lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    let first = parse(texts.first()?);
    let value_in = |settings: &[(String, String)], name: &str| {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map_or_else(|| "unset".to_string(), |(_, v)| v.clone())
    };
    for (rank, text) in texts.iter().enumerate().skip(1) {
        let other = parse(text);
        let names = first.iter().chain(&other).map(|(n, _)| n);
        for name in names {
            let (a, b) = (value_in(&first, name), value_in(&other, name));
            if a != b {
                return Some(format!(
                    "the ranks were started with different settings: {name} is {a} on rank 0 \
                     but {b} on rank {rank} (every rank of a job takes the same arguments; \
                     only --device and --accelerator may differ)"
                ));
            }
        }
    }
    None
}

/// Exits the process when a collective has waited past its timeout: a peer is hung or dead,
/// and the supervisor (`nuwa launch`) restarts the job from the last checkpoint.
pub struct Watchdog {
    /// Milliseconds since `origin` when the current collective began; 0 when none is running.
    entered_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    step: std::sync::Arc<std::sync::atomic::AtomicU64>,
    origin: std::time::Instant,
}

impl Watchdog {
    pub fn start(rank: usize, timeout: Duration) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let entered_ms = Arc::new(AtomicU64::new(0));
        let step = Arc::new(AtomicU64::new(0));
        let origin = std::time::Instant::now();
        let (e, s) = (entered_ms.clone(), step.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let began = e.load(Ordering::SeqCst);
            if began == 0 {
                continue;
            }
            let waited = (origin.elapsed().as_millis() as u64).saturating_sub(began);
            if waited > timeout.as_millis() as u64 {
                eprintln!(
                    "error: rank {rank}: step {}: waited {:.1} s in a collective (timeout {:.1} s): \
                     a peer rank is hung or dead; exiting so the job can restart",
                    s.load(Ordering::SeqCst),
                    waited as f64 / 1000.0,
                    timeout.as_secs_f64()
                );
                std::process::exit(3);
            }
        });
        Self {
            entered_ms,
            step,
            origin,
        }
    }

    /// Marks the start of a collective at `step`.
    pub fn enter(&self, step: u64) {
        use std::sync::atomic::Ordering;
        self.step.store(step, Ordering::SeqCst);
        let now = self.origin.elapsed().as_millis() as u64;
        self.entered_ms.store(now.max(1), Ordering::SeqCst);
    }

    pub fn leave(&self) {
        self.entered_ms
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_setting_a_rank_disagrees_on_is_named() {
        let same = "train.lr\t0.001\n--ep\t2\n".to_string();
        assert_eq!(first_difference(&[same.clone(), same.clone()]), None);
        let other_lr = "train.lr\t0.0003\n--ep\t2\n".to_string();
        let line = first_difference(&[same.clone(), same.clone(), other_lr]).unwrap();
        assert!(
            line.contains("train.lr is 0.001 on rank 0 but 0.0003 on rank 2"),
            "{line}"
        );
        // A setting only one rank has is said to be unset on the other.
        let extra = format!("{same}--stage-layers\t[3,1]\n");
        let line = first_difference(&[same, extra]).unwrap();
        assert!(line.contains("--stage-layers is unset on rank 0 but [3,1] on rank 1"));
    }

    #[test]
    fn a_rank_slow_for_patience_steps_is_named_once() {
        let mut watch = StragglerWatch::new(1.5, 3);
        let expected = [Some(1.0), Some(2.0), None];
        let name = |r: usize| format!("rank {r}");
        // Rank 1 at 1.6x its expected (slow), rank 2 has nothing expected (never slow).
        let steps: Vec<StragglerVerdict> = (1..=4)
            .map(|s| watch.observe(s, &[1.2, 3.2, 99.0], &expected, name, "predicted"))
            .collect();
        assert_eq!(steps[0].slow_now, [false, true, false]);
        assert!(steps[1].stragglers.is_empty());
        assert_eq!(steps[2].stragglers, [1]);
        assert_eq!(
            steps[2].notes,
            ["straggler: rank 1 ran 1.6x slower than predicted for 3 steps (step 3)"]
        );
        // Still a straggler, not named again; a normal step clears the count.
        assert_eq!(steps[3].stragglers, [1]);
        assert!(steps[3].notes.is_empty());
        let back = watch.observe(5, &[1.0, 2.0, 0.0], &expected, name, "predicted");
        assert!(back.stragglers.is_empty() && back.slow_now == [false, false, false]);
    }

    #[test]
    fn balancer_moves_work_to_the_faster_rank() {
        let mut b = Balancer::new(12, 2, &[]);
        assert_eq!(b.shares, [6, 6]);
        b.observe(&[6.0, 6.0], &[1.0, 2.0], &[false, false]);
        b.rebalance(12, &[]);
        assert_eq!(b.shares, [8, 4]);
        assert!((b.predict(1, 4).unwrap() - 4.0 / 3.0).abs() < 1e-9);
        // A step flagged slow leaves the expectation alone until the next re-balance.
        b.observe(&[8.0, 4.0], &[1.0, 8.0], &[false, true]);
        assert!((b.predict(1, 4).unwrap() - 4.0 / 3.0).abs() < 1e-9);
        b.rebalance(12, &[]);
        assert_eq!(b.shares, [11, 1]);
    }
}
