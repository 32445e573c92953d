//! Hugging Face checkpoints in and out: `config.json`, single or sharded `*.safetensors`
//! (f32, f16, bf16), the tokenizer and its chat template, for `bailing_moe` (Ling), `llama`,
//! `qwen2`, `qwen3_moe` and `mixtral`.

pub mod arch;
pub mod chat;
pub mod import;
pub mod inference;
pub mod names;
pub mod run_dir;
pub mod safetensors_dir;

pub use arch::Arch;
pub use chat::{eos_token_ids, ChatTemplate, Message};
pub use import::HfCheckpoint;
pub use inference::{InferenceModel, ModelSource};
pub use run_dir::{export_run, import_to_run, ExportDtype, ExportOptions, HF_SUBDIR};
