//! What multi-process training needs from a communicator. Every rank calls the same
//! collectives in the same order. The MPI implementation lives in `nuwa-dist`; the model (for
//! expert parallelism) and the trainer (for data parallelism) see only this trait, so the
//! single-process path and every test of the math run without MPI.

pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum across ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Every rank's `values` (all the same length), concatenated in rank order.
    fn all_gather(&self, values: &[f64]) -> Vec<f64>;
    /// Waits for every rank.
    fn barrier(&self);
    /// All-to-all with varying counts: `sent` is (`send_counts`, `send_at`), and `send` holds
    /// `send_counts[r]` values for rank `r` from `send_at[r]` on; `recv` receives what every rank sent this one, `recv_counts[r]` values
    /// from rank `r`, rank after rank (its length is their sum). Both sides must agree on the
    /// counts.
    fn all_to_all_v(
        &self,
        send: &[f32],
        sent: (&[usize], &[usize]),
        recv_counts: &[usize],
        recv: &mut [f32],
    );
    /// An all-gather within some of the ranks: all of `send` goes to every rank `r` whose
    /// `send_counts[r]` is `send.len()` (the others' are 0), and `recv_counts[r]` values come
    /// from each rank into `recv`, rank after rank: [`Collective::all_to_all_v`] with every
    /// receiver's block read from the start of `send`.
    fn all_gather_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut [f32],
    ) {
        let at = vec![0; send_counts.len()];
        self.all_to_all_v(send, (send_counts, &at), recv_counts, recv)
    }
    /// The ranks that pass the same `color`, as a communicator of their own (ranked in this
    /// one's order). Collective over this communicator.
    fn split(&self, color: usize) -> std::sync::Arc<dyn Collective>;
    /// Sends `data` to rank `to` (blocking until it may be reused).
    fn send(&self, to: usize, data: &[f32]);
    /// Receives `len` values from rank `from`.
    fn recv(&self, from: usize, len: usize) -> Vec<f32>;
    /// Sends `data` to `to` and receives `len` values from `from` at once, so two ranks that
    /// exchange with each other cannot deadlock.
    fn send_recv(&self, to: usize, data: &[f32], from: usize, len: usize) -> Vec<f32>;
}

/// Where each of consecutive blocks of `counts` values starts.
pub fn starts(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |at, &c| {
            *at += c;
            Some(*at - c)
        })
        .collect()
}

/// The single-process "communicator": sums, gathers and exchanges over one rank.
pub struct SoloCollective;

impl Collective for SoloCollective {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn all_gather(&self, values: &[f64]) -> Vec<f64> {
        values.to_vec()
    }
    fn barrier(&self) {}
    fn all_to_all_v(
        &self,
        send: &[f32],
        sent: (&[usize], &[usize]),
        _: &[usize],
        recv: &mut [f32],
    ) {
        let (count, at) = (sent.0[0], sent.1[0]);
        recv.copy_from_slice(&send[at..at + count]);
    }
    fn split(&self, _: usize) -> std::sync::Arc<dyn Collective> {
        std::sync::Arc::new(SoloCollective)
    }
    fn send(&self, to: usize, _: &[f32]) {
        unreachable!("a single process has no rank {to} to send to")
    }
    fn recv(&self, from: usize, _: usize) -> Vec<f32> {
        unreachable!("a single process has no rank {from} to receive from")
    }
    fn send_recv(&self, to: usize, _: &[f32], _: usize, _: usize) -> Vec<f32> {
        unreachable!("a single process has no rank {to} to exchange with")
    }
}

/// The pace of this process's compute within a step: test-only slowdown (fault injection's
/// `--throttle`) applied to every stretch of compute between collectives — as a slower device
/// would be slower at each layer, not only at the end of its step — and the time spent in
/// collectives inside the step, which is waiting, not this process's compute.
pub mod pace {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// The slowdown factor's bits (1.0: none).
    static SLOWDOWN: AtomicU64 = AtomicU64::new(0x3ff0_0000_0000_0000);
    static WAITED_NS: AtomicU64 = AtomicU64::new(0);

    thread_local! {
        static MARK: Cell<Option<Instant>> = const { Cell::new(None) };
    }

    /// Test-only: this process computes `factor`× slower from now on (1: full speed).
    pub fn set_slowdown(factor: f64) {
        SLOWDOWN.store(factor.max(1.0).to_bits(), Ordering::Relaxed);
    }

    /// A step's compute begins.
    pub fn start_step() {
        MARK.with(|m| m.set(Some(Instant::now())));
        WAITED_NS.store(0, Ordering::Relaxed);
    }

    /// Stretches the compute since the last mark by the slowdown; returns the time slept.
    fn stretch() -> Duration {
        let factor = f64::from_bits(SLOWDOWN.load(Ordering::Relaxed));
        let since = MARK
            .with(|m| m.get())
            .map(|t| t.elapsed())
            .unwrap_or_default();
        if factor <= 1.0 || since.is_zero() {
            return Duration::ZERO;
        }
        let extra = since.mul_f64(factor - 1.0);
        wait_exactly(extra);
        extra
    }

    /// Waits `d`: sleeps all but the last stretch of it and spins through that, as a sleep
    /// alone overshoots by the timer slack (~0.1 ms), which a rank stretched before each of
    /// dozens of collectives a step would pay dozens of times — a slower device than asked.
    fn wait_exactly(d: Duration) {
        const SPIN: Duration = Duration::from_micros(300);
        let deadline = Instant::now() + d;
        if d > SPIN {
            std::thread::sleep(d - SPIN);
        }
        while Instant::now() < deadline {
            std::hint::spin_loop();
        }
    }

    /// Runs a collective inside a step: the compute before it stretched, its own time counted
    /// as waiting.
    pub fn collective<R>(f: impl FnOnce() -> R) -> R {
        collective_after(f).0
    }

    /// As [`collective`], also returning the seconds of compute before it (since the last
    /// collective or the step's start, its stretch included).
    pub fn collective_after<R>(f: impl FnOnce() -> R) -> (R, f64) {
        let since = MARK
            .with(|m| m.get())
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let compute = since + stretch();
        let started = Instant::now();
        let out = f();
        WAITED_NS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        MARK.with(|m| m.set(Some(Instant::now())));
        (out, compute.as_secs_f64())
    }

    /// A step's compute ends: returns (seconds slept stretching its last stretch, seconds
    /// spent in collectives since [`start_step`]).
    pub fn end_step() -> (f64, f64) {
        let slept = stretch().as_secs_f64();
        MARK.with(|m| m.set(None));
        let waited = WAITED_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9;
        (slept, waited)
    }
}
