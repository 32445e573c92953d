//! The run folder, the format every nuwa command reads or writes: `config.toml` (the resolved
//! [`RunConfig`]), the tokenizer, `metrics.jsonl`, `loss.svg`, and
//! `checkpoints/step-NNNNNNNN/` with `model.safetensors`, `optimizer.safetensors` and
//! `trainer.json` ([`checkpoint::TrainerState`]). The trainer writes it; `sample`, `serve`,
//! `export` and `launch` read it through this crate without linking the trainer.

pub mod checkpoint;
pub mod config;
pub mod lock;
pub mod sharded;
pub mod spikes;
pub mod writer;

pub use checkpoint::{load_for_inference, TrainerState};
pub use config::{DataConfig, RunConfig, RunFile, Schedule, TrainConfig};
pub use lock::RunLock;
pub use spikes::{SpikeGuard, Verdict};
pub use writer::CheckpointWriter;
