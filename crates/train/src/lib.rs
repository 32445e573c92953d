//! nuwa's trainer: AdamW, learning-rate schedules, the training loop, metrics, plots and
//! checkpoints that resume exactly.

pub mod bench;
pub mod expert;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod pipeline;
pub mod setup;
pub mod step;
pub mod strategy;
pub mod trainer;

pub use trainer::{
    train, ResumeOverrides, StepHook, StepRecord, StepView, TrainOptions, TrainReport,
};
