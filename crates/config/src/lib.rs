//! Resolving what a user asked for into a [`RunConfig`], the same way for every command:
//! a preset name, a model config file (a Hugging Face `config.json` of any supported
//! architecture, or TOML with Ling's field names), a `run.toml` (`preset = ...` or a `[model]`
//! table, plus `[train]` and `[data]`), then command-line overrides. `train`, `inspect` and
//! `plan` all read models through here, so a file one accepts the others accept.

use anyhow::{anyhow, Context, Result};
use nuwa_model::ModelConfig;
use nuwa_run::{DataConfig, RunConfig, RunFile, Schedule, TrainConfig};
use std::path::{Path, PathBuf};

/// The preset a run uses when nothing names a model.
pub const DEFAULT_PRESET: &str = "tiny-moe";

/// Where the model comes from: at most one of a preset and a model config file, with a
/// `run.toml` underneath (the flags win over the file).
#[derive(Debug, Clone, Default)]
pub struct ModelChoice {
    /// A `run.toml`.
    pub run_file: Option<PathBuf>,
    pub preset: Option<String>,
    pub model_config: Option<PathBuf>,
}

/// Reads a `run.toml`; unknown keys are errors naming the key.
pub fn read_run_file(path: &Path) -> Result<RunFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// A model config file: a Hugging Face `config.json` of any supported architecture, or TOML
/// with nuwa's (bailing_moe) field names.
pub fn model_config_file(path: &Path) -> Result<ModelConfig> {
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        if json.get("model_type").is_some() {
            return Ok(nuwa_hf::arch::config_from_hf(&json, &path.display().to_string())?.1);
        }
    }
    Ok(ModelConfig::from_file(path)?)
}

/// A preset name or the path of a model config file (the planner's `--model`).
pub fn model_by_name(name: &str) -> Result<ModelConfig> {
    match ModelConfig::preset(name) {
        Ok(c) => Ok(c),
        Err(_) if Path::new(name).exists() => model_config_file(Path::new(name)),
        Err(e) => Err(anyhow!("{name}: {e}, and no such config file")),
    }
}

impl ModelChoice {
    /// The model and the run file it came with. A preset's `vocab_size` is 0 when `data_vocab`
    /// is true: the vocabulary then follows the training data.
    pub fn resolve(&self, data_vocab: bool) -> Result<(ModelConfig, Option<RunFile>)> {
        let file = self.run_file.as_deref().map(read_run_file).transpose()?;
        let preset = self
            .preset
            .clone()
            .or_else(|| file.as_ref().and_then(|f| f.preset.clone()));
        let model = if let Some(path) = &self.model_config {
            model_config_file(path)?
        } else if let Some(table) = file.as_ref().and_then(|f| f.model.clone()) {
            let what = self.run_file.as_ref().map(|p| p.display().to_string());
            table
                .try_into::<ModelConfig>()
                .map_err(|e| anyhow!("{}: [model]: {e}", what.unwrap_or_default()))?
        } else {
            let preset = ModelConfig::preset(preset.as_deref().unwrap_or(DEFAULT_PRESET))?;
            ModelConfig {
                vocab_size: if data_vocab { 0 } else { preset.vocab_size },
                ..preset
            }
        };
        Ok((model, file))
    }
}

/// Flag overrides of the model's shape.
#[derive(Debug, Clone, Default)]
pub struct ModelOverrides {
    /// `hidden_size` (FFN widths follow: 3× dense, 1× per expert).
    pub hidden_size: Option<usize>,
    pub layers: Option<usize>,
    /// Dropout on embeddings and on attention/FFN outputs.
    pub dropout: Option<f64>,
}

/// Flag overrides of `[train]`.
#[derive(Debug, Clone, Default)]
pub struct TrainOverrides {
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
    pub grad_accum: Option<usize>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub schedule: Option<Schedule>,
    pub weight_decay: Option<f64>,
    pub grad_clip: Option<f64>,
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub seed: Option<u64>,
    pub precision: Option<nuwa_model::kernels::bf16_matmul::Precision>,
}

impl ModelOverrides {
    pub fn apply(&self, model: &mut ModelConfig) {
        if let Some(h) = self.hidden_size {
            model.hidden_size = h;
            model.intermediate_size = 3 * h;
            if model.is_moe() {
                model.moe_intermediate_size = h;
            }
        }
        if let Some(l) = self.layers {
            model.num_hidden_layers = l;
        }
        if let Some(p) = self.dropout {
            model.embedding_dropout = p;
            model.output_dropout = p;
        }
    }
}

impl TrainOverrides {
    pub fn apply(&self, t: &mut TrainConfig) {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { t.$field = v; } )* };
        }
        set!(
            steps,
            batch_size,
            seq_len,
            grad_accum,
            lr,
            min_lr,
            warmup_steps,
            weight_decay,
            grad_clip,
            eval_every,
            checkpoint_every,
            seed,
            precision
        );
        if let (Some(lr), None) = (self.lr, self.min_lr) {
            t.min_lr = lr / 10.0;
        }
        if let Some(s) = &self.schedule {
            t.schedule = s.clone();
        }
    }
}

/// The whole run configuration: the model, then `[train]` and `[data]` from the run file,
/// then the overrides; `data` (a prepared folder) wins over the file's.
pub fn resolve_run(
    choice: &ModelChoice,
    model_overrides: &ModelOverrides,
    train_overrides: &TrainOverrides,
    data: Option<&Path>,
) -> Result<RunConfig> {
    let (mut model, file) = choice.resolve(true)?;
    model_overrides.apply(&mut model);
    let mut train = file
        .as_ref()
        .and_then(|f| f.train.clone())
        .unwrap_or_default();
    let mut data_cfg: DataConfig = file.and_then(|f| f.data).unwrap_or_default();
    train_overrides.apply(&mut train);
    if let Some(d) = data {
        // Absolute, so a resume from another folder still finds the data.
        let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf());
        data_cfg.dir = Some(d.display().to_string());
    }
    Ok(RunConfig {
        model,
        train,
        data: data_cfg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hf_config_json_and_a_preset_resolve_alike_everywhere() {
        let dir = std::env::temp_dir().join(format!("nuwa-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let json = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}"#;
        std::fs::write(&path, json).unwrap();
        let choice = ModelChoice {
            model_config: Some(path.clone()),
            ..Default::default()
        };
        let (model, _) = choice.resolve(true).unwrap();
        assert_eq!((model.model_type.as_str(), model.vocab_size), ("llama", 64));
        assert_eq!(model_by_name(path.to_str().unwrap()).unwrap(), model);
        let preset = ModelChoice::default().resolve(false).unwrap().0;
        assert_eq!(preset, ModelConfig::preset(DEFAULT_PRESET).unwrap());
        let err = model_by_name("no-such-model").unwrap_err().to_string();
        assert!(err.contains("no-such-model"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overrides_win_over_the_run_file() {
        let dir = std::env::temp_dir().join(format!("nuwa-config-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(
            &path,
            "preset = \"tiny-dense\"\n[train]\nsteps = 7\nlr = 0.5\n",
        )
        .unwrap();
        let choice = ModelChoice {
            run_file: Some(path),
            ..Default::default()
        };
        let train = TrainOverrides {
            lr: Some(0.1),
            ..Default::default()
        };
        let cfg = resolve_run(&choice, &ModelOverrides::default(), &train, None).unwrap();
        assert_eq!(cfg.model.num_experts, 0, "the file's preset");
        assert_eq!(
            (cfg.train.steps, cfg.train.lr, cfg.train.min_lr),
            (7, 0.1, 0.01)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
