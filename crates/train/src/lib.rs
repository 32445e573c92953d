//! nuwa's trainer: AdamW, learning-rate schedules, the training loop, metrics, plots and
//! checkpoints that resume exactly.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod hardware;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod trainer;
pub mod weights;

pub use config::{DataConfig, RunConfig, RunFile, Schedule, TrainConfig};
pub use trainer::{load_for_inference, train, StepRecord, TrainOptions, TrainReport};
