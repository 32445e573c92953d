//! nuwa's model: one configurable decoder language model, dense or mixture-of-experts, in the
//! shape of Ling (`bailing_moe`), written once against Burn so it runs on any backend.

pub mod batch;
pub mod cache;
pub mod config;
pub mod expert_parallel;
pub mod layers;
pub mod model;
pub mod moe;
pub mod names;
pub mod paged;
pub mod path;
pub mod stage;
pub mod trace;
pub mod weights;

pub use cache::{KvCache, KvStore, Positions};
pub use config::{ConfigError, ModelConfig, ModelCounts, ScoreFunction, TRAIN_BYTES_PER_PARAM};
pub use model::{ForwardOutput, LanguageModel, Logits};
pub use moe::RouterStats;
pub use path::ModulePath;
pub mod generate;
pub mod init;
pub mod kernels;
pub mod loss;

pub use generate::{
    generate, generate_scored, generate_until, token_logprobs, SamplingOptions, TokenLogprobs,
};
pub use loss::cross_entropy;
