//! `nuwa inspect`: a model's parameter counts and training FLOPs per token.

use anyhow::Result;
use clap::Args;
use nuwa_config::ModelChoice;
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    /// A run.toml (as `nuwa train --config` reads it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// tiny-moe | tiny-dense | ling-lite | ling-plus | ling-mini-2 | ling-flash-2 (default tiny-moe).
    #[arg(long)]
    preset: Option<String>,
    /// A model config file (HF config.json or TOML) instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    model_config: Option<PathBuf>,
    /// Context length for the attention FLOPs.
    #[arg(long, default_value_t = 4096)]
    context: usize,
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let choice = ModelChoice {
        run_file: a.config.clone(),
        preset: a.preset.clone(),
        model_config: a.model_config.clone(),
    };
    let (cfg, _) = choice.resolve(false)?;
    let name = match (&a.model_config, &a.preset, &a.config) {
        (Some(p), _, _) | (None, None, Some(p)) => p.display().to_string(),
        (None, Some(preset), _) => preset.clone(),
        (None, None, None) => nuwa_config::DEFAULT_PRESET.to_string(),
    };
    cfg.validate()?;
    let c = cfg.counts(a.context);
    let b = |n: u64| format!("{:.3}B", n as f64 / 1e9);
    println!(
        "model            {name} ({})",
        if cfg.is_moe() { "MoE" } else { "dense" }
    );
    println!(
        "layers           {} (hidden {}, heads {}/{} kv, head_dim {})",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim()
    );
    if cfg.is_moe() {
        println!(
            "experts          {} routed (top-{}), {} shared, width {}",
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.num_shared_experts,
            cfg.moe_intermediate_size
        );
    }
    println!(
        "total params     {} ({})",
        b(c.total_params),
        c.total_params
    );
    println!(
        "active params    {} ({})",
        b(c.active_params),
        c.active_params
    );
    println!(
        "embedding params {} ({})",
        b(c.embedding_params),
        c.embedding_params
    );
    println!(
        "train FLOPs/token {:.3e} at context {}",
        c.train_flops_per_token, a.context
    );
    Ok(())
}
