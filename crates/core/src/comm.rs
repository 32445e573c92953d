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
}
