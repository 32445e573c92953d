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
    /// All-to-all with varying counts: `send` holds `send_counts[r]` values for rank `r`,
    /// rank after rank; returns what every rank sent this one, `recv_counts[r]` values from
    /// rank `r`, rank after rank. Both sides must agree on the counts.
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize], recv_counts: &[usize]) -> Vec<f32>;
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
    fn all_to_all_v(&self, send: &[f32], _: &[usize], _: &[usize]) -> Vec<f32> {
        send.to_vec()
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
