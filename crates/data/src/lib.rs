//! nuwa's data pipeline: tokenizers, the built-in corpus, token shards with a checked
//! manifest, and a deterministic sampler whose cursor lives in the checkpoint.

pub mod corpus;
pub mod prepare;
pub mod sampler;
pub mod shards;
pub mod tokenizer;

pub use prepare::{prepare, PrepareOptions, Source};
pub use sampler::{eval_batches, Batch, BatchSampler};
pub use shards::{Dataset, Manifest, TokenShard};
pub use tokenizer::{TextStream, Tokenizer, TokenizerSpec, HF_TOKENIZER_FILE, NUWA_TOKENIZER_FILE};
