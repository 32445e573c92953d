//! Loss-spike handling, as in Ling's training recipe (Ling TR, arXiv 2503.05139): a step whose
//! loss jumps beyond a threshold over the recent trend is skipped — no update — and its data
//! run again later; if that data spikes again, its update goes through with a lowered learning
//! rate instead of being skipped forever. The state lives in each checkpoint, so a resumed run
//! judges exactly as an uninterrupted one.

use serde::{Deserialize, Serialize};

/// Accepted steps before the trend is trusted.
pub const WARMUP_STEPS: u64 = 5;
/// Steps after a skip at which its data runs again.
pub const REQUEUE_AFTER: u64 = 10;
/// The learning-rate factor for data that spikes a second time.
pub const RETRY_LR_SCALE: f64 = 0.1;
/// Weight of the newest loss in the trend (an exponential moving average).
const TREND_WEIGHT: f64 = 0.1;

/// Skipped data waiting to run again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deferred {
    /// The sampler cursor of the skipped step's first micro-batch.
    pub cursor: u64,
    /// The step (1-based) that runs it instead of fresh data.
    pub due: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpikeGuard {
    /// Moving average of accepted steps' losses.
    pub trend: Option<f64>,
    /// Steps accepted so far.
    pub accepted: u64,
    /// Steps skipped so far (the optimiser took that many fewer steps than the run).
    pub skipped: u64,
    pub deferred: Vec<Deferred>,
}

/// What to do with a step's update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Accept,
    /// A spike: no update; the data is deferred.
    Skip,
    /// Deferred data spiked again: update with the learning rate times this.
    LowerLr(f64),
}

impl SpikeGuard {
    /// The cursor of deferred data due at `step`, taken off the queue.
    pub fn due(&mut self, step: u64) -> Option<u64> {
        let i = self.deferred.iter().position(|d| d.due <= step)?;
        Some(self.deferred.remove(i).cursor)
    }

    /// Judges step `step`'s loss (`threshold`: how far above the trend, relatively, is a spike;
    /// 0 turns the guard off). `retry`: the step ran deferred data; `cursor`: where its data
    /// starts.
    pub fn judge(
        &mut self,
        step: u64,
        loss: f64,
        threshold: f64,
        retry: bool,
        cursor: u64,
    ) -> Verdict {
        if threshold <= 0.0 {
            return Verdict::Accept;
        }
        let spike = match self.trend {
            Some(trend) if self.accepted >= WARMUP_STEPS => loss > trend * (1.0 + threshold),
            _ => false,
        };
        match (spike, retry) {
            (true, false) => {
                self.skipped += 1;
                self.deferred.push(Deferred {
                    cursor,
                    due: step + REQUEUE_AFTER,
                });
                Verdict::Skip
            }
            (true, true) => Verdict::LowerLr(RETRY_LR_SCALE),
            (false, _) => {
                self.accepted += 1;
                self.trend = Some(match self.trend {
                    Some(t) => t + TREND_WEIGHT * (loss - t),
                    None => loss,
                });
                Verdict::Accept
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spike_is_skipped_requeued_and_lowered_when_it_repeats() {
        let mut g = SpikeGuard::default();
        for step in 1..=WARMUP_STEPS {
            assert_eq!(g.judge(step, 2.0, 0.5, false, step), Verdict::Accept);
        }
        // Within 50% of the trend: accepted; beyond: skipped and deferred.
        assert_eq!(g.judge(6, 2.9, 0.5, false, 6), Verdict::Accept);
        let trend = g.trend.unwrap();
        assert_eq!(g.judge(7, trend * 1.6, 0.5, false, 7), Verdict::Skip);
        assert_eq!((g.skipped, g.deferred.len()), (1, 1));
        assert_eq!(g.due(7 + REQUEUE_AFTER - 1), None);
        assert_eq!(g.due(7 + REQUEUE_AFTER), Some(7));
        assert_eq!(g.trend.unwrap(), trend, "a spike does not move the trend");
        // The same data spiking again: updated with a lower learning rate, not skipped.
        assert_eq!(
            g.judge(17, trend * 2.0, 0.5, true, 7),
            Verdict::LowerLr(RETRY_LR_SCALE)
        );
        // Off: everything passes.
        assert_eq!(
            SpikeGuard::default().judge(9, 1e9, 0.0, false, 0),
            Verdict::Accept
        );
    }
}
