//! A model ready to generate, from a run folder or straight from an HF checkpoint folder, with
//! what generation needs besides weights: tokenizer, chat template, end-of-sequence ids and
//! the context it may attend to.

use crate::chat::{bos_token_id, eos_token_ids, ChatTemplate, Message};
use crate::import::HfCheckpoint;
use crate::run_dir::HF_SUBDIR;
use anyhow::{bail, Result};
use burn::tensor::Device;
use nuwa_data::Tokenizer;
use nuwa_model::{generate_scored, LanguageModel, ModelConfig, SamplingOptions};
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A run folder (trained or imported): its newest checkpoint.
    Run(PathBuf),
    /// An HF checkpoint folder, loaded without converting it to a run.
    Hf(PathBuf),
}

impl ModelSource {
    /// A display name for the model (the folder's name).
    pub fn name(&self) -> String {
        let (ModelSource::Run(p) | ModelSource::Hf(p)) = self;
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    }
}

pub struct InferenceModel {
    pub model: LanguageModel,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub eos: Vec<u32>,
    /// The beginning-of-sequence token of a checkpoint trained elsewhere, if it names one.
    pub bos: Option<u32>,
    /// Most positions a sequence may attend to: the training context of a nuwa run, the full
    /// `max_position_embeddings` of a checkpoint trained elsewhere.
    pub window: usize,
    /// Whether prompts get the tokenizer's special tokens (a pretrained HF tokenizer's BOS).
    pub add_special_tokens: bool,
}

impl InferenceModel {
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        match source {
            ModelSource::Run(run) => {
                let (model, tokenizer, cfg) = nuwa_run::load_for_inference(run, device)?;
                let hf = run.join(HF_SUBDIR);
                let imported = hf.is_dir();
                Ok(Self {
                    window: if imported {
                        cfg.model.max_position_embeddings
                    } else {
                        cfg.train.seq_len
                    },
                    chat_template: if imported {
                        ChatTemplate::load(&hf)?
                    } else {
                        None
                    },
                    eos: if imported {
                        eos_token_ids(&hf)?
                    } else {
                        Vec::new()
                    },
                    bos: if imported { bos_token_id(&hf)? } else { None },
                    add_special_tokens: imported,
                    model,
                    config: cfg.model,
                    tokenizer,
                })
            }
            ModelSource::Hf(dir) => Self::from_hf(dir, device),
        }
    }

    fn from_hf(dir: &Path, device: &Device) -> Result<Self> {
        let ckpt = HfCheckpoint::open(dir)?;
        let model = ckpt.load_model(device)?;
        Ok(Self {
            window: ckpt.config.max_position_embeddings,
            tokenizer: ckpt.tokenizer()?,
            chat_template: ChatTemplate::load(dir)?,
            eos: eos_token_ids(dir)?,
            bos: bos_token_id(dir)?,
            add_special_tokens: true,
            model,
            config: ckpt.config,
        })
    }

    /// Token ids of a plain prompt; one that encodes to nothing (whitespace to a word-level
    /// tokenizer) starts from the BOS token where the model has one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = if self.add_special_tokens {
            self.tokenizer.encode_prompt(text)?
        } else {
            self.tokenizer.encode(text)?
        };
        match (ids.is_empty(), self.bos) {
            (true, Some(bos)) => Ok(vec![bos]),
            _ => Ok(ids),
        }
    }

    /// Token ids of a conversation, through the chat template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let Some(template) = &self.chat_template else {
            bail!("this model has no chat template (tokenizer_config.json `chat_template`)");
        };
        // The template writes any BOS itself.
        self.tokenizer.encode(&template.render(messages, true)?)
    }

    /// Generates after `prompt`, stopping at an end-of-sequence token (dropped from the output).
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &SamplingOptions,
        device: &Device,
        mut on_token: impl FnMut(u32),
    ) -> Vec<u32> {
        self.generate_scored(prompt, opts, device, |t, _| on_token(t))
    }

    /// [`Self::generate`], handing `on_token` each token with the logits it was picked from.
    pub fn generate_scored(
        &self,
        prompt: &[u32],
        opts: &SamplingOptions,
        device: &Device,
        mut on_token: impl FnMut(u32, &[f32]),
    ) -> Vec<u32> {
        let opts = SamplingOptions {
            window: if opts.window == 0 {
                self.window
            } else {
                opts.window
            },
            ..*opts
        };
        let eos = &self.eos;
        let mut out = generate_scored(&self.model, prompt, &opts, eos, device, |t, logits| {
            if !eos.contains(&t) {
                on_token(t, logits)
            }
        });
        if out.last().is_some_and(|t| eos.contains(t)) {
            out.pop();
        }
        out
    }
}
