//! A training run's configuration (`run.toml`): the model, the optimiser and schedule, and
//! the data. Unknown keys are errors that name the key.

use nuwa_model::ModelConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum Schedule {
    /// Linear warmup then cosine decay to `min_lr`.
    Cosine,
    /// Warmup, stable at the peak, then linear decay to `min_lr` over the last `decay_fraction`.
    Wsd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    /// WSD only: fraction of the run spent decaying.
    pub decay_fraction: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    /// MoE load-balance loss coefficient.
    pub aux_loss_coef: f64,
    /// MoE router z-loss coefficient.
    pub z_loss_coef: f64,
    /// Aux-loss-free balancing (routers with an expert bias, Ling 2.0): after each step every
    /// expert's bias moves by this much against its load — up when it got fewer tokens than
    /// the mean over experts, down when more (the whole step's load, over every process).
    /// 0 freezes the biases.
    pub expert_bias_update_rate: f64,
    /// Loss-spike handling: a step whose loss exceeds the recent trend by more than this
    /// fraction (0.5: 50% above) is skipped and its data run again 10 steps later; spiking
    /// again, it updates with a tenth of the learning rate. 0 (the default) turns it off.
    pub loss_spike_threshold: f64,
    /// Stochastic routing warm-up (Ling's recipe): over the first N steps the router logits
    /// are mixed with random logits of the same per-expert statistics, the logits' share
    /// rising linearly from 0 to 1. 0 (the default) turns it off.
    pub routing_warmup_steps: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (oldest removed first).
    pub keep_checkpoints: usize,
    pub seed: u64,
    /// Precision of the weight products: `f32`, or `bf16` (bf16 × bf16 → f32 on CPUs with
    /// AVX512-BF16; master weights, gradients and optimizer state stay f32).
    pub precision: nuwa_model::kernels::bf16_matmul::Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 500,
            batch_size: 16,
            grad_accum: 1,
            seq_len: 64,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 30,
            schedule: Schedule::Cosine,
            decay_fraction: 0.2,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            aux_loss_coef: 0.015,
            z_loss_coef: 1e-4,
            expert_bias_update_rate: 1e-3,
            loss_spike_threshold: 0.0,
            routing_warmup_steps: 0,
            eval_every: 100,
            eval_batches: 8,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            seed: 1337,
            precision: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A folder written by `nuwa data prepare`; empty means the built-in corpus.
    pub dir: Option<String>,
}

/// The model section: a preset name, a config file, or inline fields (HF names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub data: DataConfig,
}

/// What a user may write in `run.toml`: like `RunConfig`, but the model may be a preset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub model: Option<toml::Table>,
    #[serde(default)]
    pub train: Option<TrainConfig>,
    #[serde(default)]
    pub data: Option<DataConfig>,
}

impl TrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let checks: [(&str, bool, &str); 8] = [
            ("train.steps", self.steps > 0, "must be positive"),
            ("train.batch_size", self.batch_size > 0, "must be positive"),
            ("train.grad_accum", self.grad_accum > 0, "must be positive"),
            ("train.seq_len", self.seq_len > 0, "must be positive"),
            (
                "train.lr",
                self.lr > 0.0 && self.lr.is_finite(),
                "must be a positive number",
            ),
            (
                "train.min_lr",
                self.min_lr >= 0.0 && self.min_lr <= self.lr,
                "must be in [0, lr]",
            ),
            (
                "train.eval_batches",
                self.eval_batches > 0,
                "must be positive",
            ),
            (
                "train.keep_checkpoints",
                self.keep_checkpoints > 0,
                "must be positive",
            ),
        ];
        for (field, ok, problem) in checks {
            if !ok {
                anyhow::bail!("config field `{field}`: {problem}");
            }
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            anyhow::bail!("config fields `train.beta1`/`train.beta2`: must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.decay_fraction) {
            anyhow::bail!("config field `train.decay_fraction`: must be in [0, 1]");
        }
        let non_negative = [
            ("train.weight_decay", self.weight_decay),
            ("train.grad_clip", self.grad_clip),
            (
                "train.expert_bias_update_rate",
                self.expert_bias_update_rate,
            ),
            ("train.loss_spike_threshold", self.loss_spike_threshold),
            ("train.aux_loss_coef", self.aux_loss_coef),
            ("train.z_loss_coef", self.z_loss_coef),
        ];
        for (field, value) in non_negative {
            if !(value >= 0.0 && value.is_finite()) {
                anyhow::bail!("config field `{field}`: {value} must be a non-negative number");
            }
        }
        // config.toml stores integers as TOML's signed 64-bit numbers.
        let counts = [
            ("train.steps", self.steps),
            ("train.warmup_steps", self.warmup_steps),
            ("train.eval_every", self.eval_every),
            ("train.checkpoint_every", self.checkpoint_every),
            ("train.seed", self.seed),
            ("train.routing_warmup_steps", self.routing_warmup_steps),
        ];
        for (field, value) in counts {
            if value > i64::MAX as u64 {
                anyhow::bail!(
                    "config field `{field}`: {value} is too large (at most {})",
                    i64::MAX
                );
            }
        }
        Ok(())
    }

    /// Learning rate at optimiser step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let progress = |from: u64| {
            let span = self.steps.saturating_sub(from).max(1) as f64;
            ((step - from) as f64 / span).min(1.0)
        };
        match self.schedule {
            Schedule::Cosine => {
                let p = progress(self.warmup_steps);
                self.min_lr
                    + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
            }
            Schedule::Wsd => {
                let decay_start = ((self.steps as f64) * (1.0 - self.decay_fraction)) as u64;
                if step < decay_start.max(self.warmup_steps) {
                    self.lr
                } else {
                    let p = progress(decay_start.max(self.warmup_steps));
                    self.lr + (self.min_lr - self.lr) * p
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_and_decay() {
        let cfg = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            lr: 1.0,
            min_lr: 0.1,
            ..Default::default()
        };
        assert!((cfg.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((cfg.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(100) - 0.1).abs() < 1e-9);
        let wsd = TrainConfig {
            schedule: Schedule::Wsd,
            decay_fraction: 0.2,
            ..cfg
        };
        assert_eq!(wsd.lr_at(50), 1.0);
        assert!(wsd.lr_at(90) < 1.0 && wsd.lr_at(90) > 0.1);
        assert!((wsd.lr_at(100) - 0.1).abs() < 1e-9);
    }

    #[test]
    fn unknown_train_key_is_named() {
        let err = toml::from_str::<RunFile>("[train]\nstepz = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stepz"), "{err}");
    }
}
