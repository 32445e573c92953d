//! Training behaviour: the loss falls, resume is exact, Shakespeare learns, failed saves keep
//! the last good checkpoint.

mod common;

use burn::tensor::Device;
use common::{shakespeare, TempDir};
use nuwa_data::{PrepareOptions, Source, TokenizerSpec};
use nuwa_model::weights::{from_safetensors, to_safetensors, HostTensor};
use nuwa_model::ModelConfig;
use nuwa_run::checkpoint::{self, list_checkpoints};
use nuwa_run::TrainerState;
use nuwa_run::{DataConfig, RunConfig, TrainConfig};
use nuwa_train::{train, TrainOptions, TrainReport};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Dropout draws from the backend's process-wide RNG, seeded per step: runs in one process
/// must not interleave, or they would consume each other's random numbers.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn options(run: &Path, config: RunConfig, resume: bool) -> TrainOptions {
    TrainOptions {
        run_dir: run.to_path_buf(),
        config,
        resume,
        device: Device::default(),
        show_progress: false,
        stop: Arc::new(AtomicBool::new(false)),
        peak_flops: Some(1e12),
        stop_at: None,
        init_weights: None,
        dist: None,
        resume_overrides: Default::default(),
        allow_data_change: false,
        sync_checkpoints: false,
        step_hook: None,
    }
}

fn builtin_data(dir: &Path) -> String {
    nuwa_data::prepare(&PrepareOptions {
        source: Source::Builtin,
        tokenizer: TokenizerSpec::Char,
        out_dir: dir.to_path_buf(),
        val_fraction: 0.1,
        force: true,
    })
    .unwrap();
    dir.display().to_string()
}

fn tiny_moe_run(data: &str, steps: u64) -> RunConfig {
    RunConfig {
        model: ModelConfig {
            vocab_size: 0,
            num_hidden_layers: 2,
            hidden_size: 64,
            intermediate_size: 128,
            moe_intermediate_size: 64,
            // Dropout on, so the test also covers the RNG being restored.
            embedding_dropout: 0.1,
            output_dropout: 0.1,
            ..ModelConfig::preset("tiny-moe").unwrap()
        },
        train: TrainConfig {
            steps,
            batch_size: 4,
            seq_len: 32,
            warmup_steps: 2,
            eval_every: 3,
            eval_batches: 2,
            checkpoint_every: 1000,
            ..TrainConfig::default()
        },
        data: DataConfig {
            dir: Some(data.to_string()),
        },
    }
}

fn losses(r: &TrainReport) -> Vec<f64> {
    r.steps.iter().map(|s| s.loss).collect()
}

#[test]
fn resume_continues_exactly() {
    let _guard = serial();
    let tmp = TempDir::new("resume");
    let data = builtin_data(&tmp.path().join("data"));
    let n = 4;

    let straight_dir = tmp.path().join("straight");
    let straight = train(options(&straight_dir, tiny_moe_run(&data, 2 * n), false)).unwrap();

    let split_dir = tmp.path().join("split");
    let first = train(TrainOptions {
        stop_at: Some(n),
        init_weights: None,
        dist: None,
        ..options(&split_dir, tiny_moe_run(&data, 2 * n), false)
    })
    .unwrap();
    assert!(first.interrupted);
    let second = train(options(&split_dir, tiny_moe_run(&data, 2 * n), true)).unwrap();

    let mut resumed = losses(&first);
    resumed.extend(losses(&second));
    assert_eq!(resumed.len(), 2 * n as usize);
    for (i, (a, b)) in losses(&straight).iter().zip(&resumed).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6,
            "step {}: straight {a} vs resumed {b}",
            i + 1
        );
    }
    // Same weights bit for bit at the end.
    let a = checkpoint::load_latest(&straight_dir).unwrap();
    let b = checkpoint::load_latest(&split_dir).unwrap();
    assert_eq!(a.state.checksums, b.state.checksums);
    assert_eq!(a.state.sampler, b.state.sampler);
}

/// A tensor map in checkpoint format 1's names: enum variants in the path, one tensor per
/// routed expert (what nuwa wrote before stacked experts).
fn to_format_1(
    tensors: std::collections::BTreeMap<String, HostTensor>,
) -> std::collections::BTreeMap<String, HostTensor> {
    let mut out = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        if let Some((prefix, rest)) = name.split_once(".moe.experts.") {
            let (proj, moment) = rest.split_once('.').map_or((rest, ""), |(p, m)| (p, m));
            let experts = 8; // tiny-moe
            let per = t.data.len() / experts;
            for e in 0..experts {
                let shape = if moment.is_empty() {
                    t.shape[1..].to_vec()
                } else {
                    vec![per]
                };
                let dot = if moment.is_empty() { "" } else { "." };
                let data = t.data[e * per..(e + 1) * per].to_vec();
                let key = format!("{prefix}.mlp.Moe.experts.{e}.{proj}.weight{dot}{moment}");
                out.insert(key, HostTensor { shape, data });
            }
            continue;
        }
        let renamed = name
            .replacen(".moe.", ".mlp.Moe.", 1)
            .replacen(".mlp.gate_proj", ".mlp.Dense.gate_proj", 1)
            .replacen(".mlp.up_proj", ".mlp.Dense.up_proj", 1)
            .replacen(".mlp.down_proj", ".mlp.Dense.down_proj", 1);
        out.insert(renamed, t);
    }
    out
}

/// Rewrites a checkpoint's weights and optimiser state in format 1 (with fresh checksums).
fn rewrite_as_format_1(dir: &Path) {
    let mut state: TrainerState =
        serde_json::from_slice(&std::fs::read(dir.join("trainer.json")).unwrap()).unwrap();
    // Format 1 had no `format` field in trainer.json.
    state.format = 0;
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let path = dir.join(file);
        let v2 = from_safetensors(&std::fs::read(&path).unwrap(), file).unwrap();
        assert!(v2.keys().any(|k| k.contains(".moe.experts.")), "{file}");
        let bytes = to_safetensors(&to_format_1(v2)).unwrap();
        state
            .checksums
            .insert(file.to_string(), nuwa_core::sha256_hex(&bytes));
        std::fs::write(&path, bytes).unwrap();
    }
    let json = serde_json::to_string_pretty(&state).unwrap();
    std::fs::write(dir.join("trainer.json"), json).unwrap();
}

#[test]
fn a_run_in_checkpoint_format_1_resumes_exactly() {
    let _guard = serial();
    let tmp = TempDir::new("format1");
    let data = builtin_data(&tmp.path().join("data"));
    let n = 3;
    let straight_dir = tmp.path().join("straight");
    // Without NormHead, whose meaning changed in format 3 (see the next test).
    let run_config = || {
        let mut c = tiny_moe_run(&data, 2 * n);
        c.model.norm_head = false;
        c
    };
    let straight = train(options(&straight_dir, run_config(), false)).unwrap();
    let old_dir = tmp.path().join("old");
    let first = train(TrainOptions {
        stop_at: Some(n),
        ..options(&old_dir, run_config(), false)
    })
    .unwrap();
    let (_, ckpt) = list_checkpoints(&old_dir).pop().unwrap();
    rewrite_as_format_1(&ckpt);
    let second = train(options(&old_dir, run_config(), true)).unwrap();
    let mut resumed = losses(&first);
    resumed.extend(losses(&second));
    assert_eq!(
        resumed,
        losses(&straight),
        "weights and moments converted exactly"
    );
    // The new checkpoint is written in format 2.
    let latest = checkpoint::load_latest(&old_dir).unwrap();
    assert!(latest
        .weights
        .keys()
        .all(|k| !k.contains("Moe") && !k.contains("Dense")));
    assert_eq!(
        latest.state.checksums,
        checkpoint::load_latest(&straight_dir)
            .unwrap()
            .state
            .checksums
    );
}

#[test]
fn a_run_with_the_old_norm_head_is_not_reinterpreted() {
    let _guard = serial();
    let tmp = TempDir::new("old-normhead");
    let data = builtin_data(&tmp.path().join("data"));
    let run = tmp.path().join("run");
    train(options(&run, tiny_moe_run(&data, 2), false)).unwrap();
    let (_, ckpt) = list_checkpoints(&run).pop().unwrap();
    rewrite_as_format_1(&ckpt);

    // Training on would change the model: refused in one line naming the way out.
    let Err(err) = train(options(&run, tiny_moe_run(&data, 4), true)) else {
        panic!("resume of an old NormHead run was accepted");
    };
    let err = err.to_string();
    assert!(
        err.contains("before checkpoint format 3") && err.contains("nuwa export"),
        "{err}"
    );

    // Inference keeps the old head exactly: a plain head whose vocab columns have unit norm.
    let old = checkpoint::load_latest(&run).unwrap();
    let head = &old.weights["lm_head.weight"];
    let (model, _, cfg) = nuwa_run::load_for_inference(&run, &Device::default()).unwrap();
    assert!(!cfg.model.norm_head);
    let baked: Vec<f32> = model
        .lm_head
        .unwrap()
        .weight
        .val()
        .into_data()
        .iter::<f32>()
        .collect();
    let [hidden, vocab] = [head.shape[0], head.shape[1]];
    for v in [0, vocab / 2, vocab - 1] {
        let norm: f32 = (0..hidden)
            .map(|i| head.data[i * vocab + v].powi(2))
            .sum::<f32>()
            .sqrt();
        for i in [0, hidden - 1] {
            let want = head.data[i * vocab + v] / norm;
            assert!(
                (baked[i * vocab + v] - want).abs() < 1e-6,
                "vocab {v}, hidden {i}"
            );
        }
        let col: f32 = (0..hidden).map(|i| baked[i * vocab + v].powi(2)).sum();
        assert!(
            (col - 1.0).abs() < 1e-4,
            "column {v} has squared norm {col}"
        );
    }
}

#[test]
fn default_tiny_moe_loss_falls_and_router_losses_are_logged() {
    let _guard = serial();
    let tmp = TempDir::new("falls");
    let run = tmp.path().join("run");
    let mut cfg = RunConfig {
        model: ModelConfig {
            vocab_size: 0,
            ..ModelConfig::preset("tiny-moe").unwrap()
        },
        train: TrainConfig {
            steps: 40,
            eval_every: 20,
            ..TrainConfig::default()
        },
        data: DataConfig::default(),
    };
    cfg.train.checkpoint_every = 10;
    cfg.train.keep_checkpoints = 2;
    let report = train(options(&run, cfg, false)).unwrap();
    let l = losses(&report);
    assert!(l[l.len() - 1] < l[0] - 1.0, "loss did not fall: {l:?}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(
        last["load_balance_loss"].as_f64().unwrap() >= 0.99,
        "{last}"
    );
    assert!(last["z_loss"].as_f64().unwrap() > 0.0, "{last}");
    assert!(last["val_loss"].as_f64().is_some(), "{last}");
    assert!(last["mfu"].as_f64().unwrap() > 0.0, "{last}");
    // Tokens per expert of every MoE layer (tiny-moe: 3 MoE layers of 8 experts, top-2).
    let load = last["tokens_per_expert"]
        .as_array()
        .expect("tokens_per_expert logged");
    let assigned: u64 = load[0]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_u64())
        .sum();
    assert_eq!(
        (load.len(), load[0].as_array().unwrap().len()),
        (3, 8),
        "{last}"
    );
    assert_eq!(
        assigned,
        16 * 64 * 2,
        "every token's top-2 assignments counted"
    );
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("polyline"),
        "plot has no curve"
    );
    let kept: Vec<u64> = list_checkpoints(&run).iter().map(|c| c.0).collect();
    assert_eq!(
        kept,
        vec![30, 40],
        "only the newest two checkpoints are kept"
    );
}

#[test]
fn shakespeare_char_dense_learns_below_two_nats() {
    let _guard = serial();
    let tmp = TempDir::new("shakespeare");
    let data = tmp.path().join("data");
    nuwa_data::prepare(&PrepareOptions {
        source: Source::Paths(vec![shakespeare()]),
        tokenizer: TokenizerSpec::Char,
        out_dir: data.clone(),
        val_fraction: 0.1,
        force: true,
    })
    .unwrap();
    let cfg = RunConfig {
        model: ModelConfig {
            vocab_size: 0,
            ..ModelConfig::preset("tiny-dense").unwrap()
        },
        train: TrainConfig {
            steps: 600,
            seq_len: 64,
            batch_size: 16,
            eval_every: 600,
            checkpoint_every: 600,
            ..TrainConfig::default()
        },
        data: DataConfig {
            dir: Some(data.display().to_string()),
        },
    };
    let report = train(options(&tmp.path().join("run"), cfg, false)).unwrap();
    let val = report.last_val_loss.unwrap();
    assert!(val < 2.0, "validation loss {val} is not below 2.0");
}

#[test]
fn failed_save_keeps_the_last_good_checkpoint() {
    let _guard = serial();
    let tmp = TempDir::new("failsave");
    let data = builtin_data(&tmp.path().join("data"));
    let run = tmp.path().join("run");
    train(options(&run, tiny_moe_run(&data, 2), false)).unwrap();
    let good = checkpoint::load_latest(&run).unwrap();

    // Block the temporary folder the next save needs: the save must fail cleanly.
    let blocker = checkpoint::checkpoints_dir(&run)
        .join(format!(".tmp-step-00000003-{}", std::process::id()));
    std::fs::write(&blocker, b"in the way").unwrap();
    let err = train(TrainOptions {
        resume_overrides: nuwa_train::ResumeOverrides {
            steps: Some(3),
            ..Default::default()
        },
        ..options(&run, tiny_moe_run(&data, 3), true)
    });
    assert!(err.is_err(), "save should have failed");

    let after = checkpoint::load_latest(&run).unwrap();
    assert_eq!(after.state.step, 2);
    assert_eq!(after.state.checksums, good.state.checksums);
}

/// A tiny Ling 2.0-style run: sigmoid router over 8 experts in 4 groups (2 chosen), expert
/// bias, QK-norm, half RoPE, one multi-token-prediction layer.
fn tiny_ling2_run(data: &str, steps: u64, rate: f64) -> RunConfig {
    let mut run = tiny_moe_run(data, steps);
    run.model.score_function = nuwa_model::ScoreFunction::Sigmoid;
    run.model.n_group = 4;
    run.model.topk_group = 2;
    run.model.routed_scaling_factor = 2.5;
    run.model.moe_router_enable_expert_bias = true;
    run.model.use_qk_norm = true;
    run.model.partial_rotary_factor = 0.5;
    run.model.norm_head = false;
    run.model.num_nextn_predict_layers = 1;
    run.model.mtp_loss_scaling_factor = 0.3;
    run.train.expert_bias_update_rate = rate;
    run.train.grad_accum = 2;
    run
}

fn expert_biases(run: &Path) -> Vec<Vec<f32>> {
    let latest = checkpoint::load_latest(run).unwrap();
    latest
        .weights
        .iter()
        .filter(|(k, _)| k.ends_with("moe.expert_bias"))
        .map(|(_, t)| t.data.clone())
        .collect()
}

#[test]
fn aux_loss_free_biases_move_against_the_load_and_never_by_gradient() {
    let _guard = serial();
    let tmp = TempDir::new("aux-free");
    let data = builtin_data(&tmp.path().join("data"));

    // Frozen (rate 0): the optimiser leaves the biases at zero while the model trains.
    let frozen = tmp.path().join("frozen");
    let report = train(options(&frozen, tiny_ling2_run(&data, 4, 0.0), false)).unwrap();
    assert!(report.steps.iter().all(|s| s.loss.is_finite()));
    let biases = expert_biases(&frozen);
    assert_eq!(biases.len(), 2, "one MoE layer and the MTP layer");
    assert!(biases.iter().flatten().all(|&b| b == 0.0), "{biases:?}");

    // Moving: after each step, bias += rate · sign(mean load − load), from the whole step's
    // load (both micro-batches) logged in metrics.jsonl.
    let rate = 0.01;
    let moving = tmp.path().join("moving");
    train(options(&moving, tiny_ling2_run(&data, 5, rate), false)).unwrap();
    let metrics = std::fs::read_to_string(moving.join("metrics.jsonl")).unwrap();
    let mut want = vec![0.0f32; 8];
    for line in metrics.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let load: Vec<f64> = record["expert_load"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let total: f64 = load.iter().sum();
        // 4 sequences × 32 tokens × 2 micro-batches × top-2.
        assert_eq!(total, (4 * 32 * 2 * 2) as f64);
        let mean = total / load.len() as f64;
        for (b, l) in want.iter_mut().zip(&load) {
            *b += (rate
                * if *l < mean {
                    1.0
                } else if *l > mean {
                    -1.0
                } else {
                    0.0
                }) as f32;
        }
    }
    let got = &expert_biases(&moving)[0];
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    assert!(got.iter().any(|&b| b != 0.0));
}

#[test]
fn merge_averages_the_last_checkpoints_into_a_run_or_an_hf_folder() {
    let _guard = serial();
    let tmp = TempDir::new("merge");
    let data = builtin_data(&tmp.path().join("data"));
    let run = tmp.path().join("run");
    let mut config = tiny_moe_run(&data, 4);
    config.train.checkpoint_every = 1;
    config.train.keep_checkpoints = 3;
    train(options(&run, config, false)).unwrap();
    let kept = list_checkpoints(&run);
    assert_eq!(kept.len(), 3);

    let merged = tmp.path().join("merged");
    let out = common::nuwa(&[
        "merge",
        run.to_str().unwrap(),
        "--last",
        "3",
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each weight is the mean of the three checkpoints' values.
    let parts: Vec<_> = kept
        .iter()
        .map(|(_, d)| checkpoint::load_latest(d).unwrap())
        .collect();
    let got = checkpoint::load_latest(&merged).unwrap();
    assert_eq!(got.state.step, 4);
    for (name, t) in &got.weights {
        for i in [0, t.data.len() / 2, t.data.len() - 1] {
            let mean = parts
                .iter()
                .map(|p| p.weights[name].data[i] as f64)
                .sum::<f64>()
                / 3.0;
            assert!((t.data[i] as f64 - mean).abs() < 1e-6, "{name}[{i}]");
        }
    }
    // The merged run samples, and exports as an HF folder straight away.
    let sampled = common::nuwa(&[
        "sample",
        "--run",
        merged.to_str().unwrap(),
        "--max-tokens",
        "5",
    ]);
    assert!(
        sampled.status.success(),
        "{}",
        String::from_utf8_lossy(&sampled.stderr)
    );
    let hf = tmp.path().join("hf");
    let out = common::nuwa(&[
        "merge",
        run.to_str().unwrap(),
        "--last",
        "2",
        "--out",
        hf.to_str().unwrap(),
        "--hf",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hf.join("model.safetensors").exists() && hf.join("tokenizer.json").exists());
    // The export builds in transformers: a pad_token_id inside the vocabulary, and a
    // tokenizer.json encoding as the run's own char tokenizer does.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap();
    assert!(config["pad_token_id"].as_u64().unwrap() < vocab, "{config}");
    let ours = nuwa_data::Tokenizer::load(&run).unwrap();
    let theirs = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let text = "the old dog follows a boat.\n12 plus 7 is 19.";
    let ids = theirs.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(ids, ours.encode(text).unwrap());

    // More checkpoints than the run keeps: one clear line, nothing written.
    let none = tmp.path().join("none");
    let out = common::nuwa(&[
        "merge",
        run.to_str().unwrap(),
        "--last",
        "5",
        "--out",
        none.to_str().unwrap(),
    ]);
    common::assert_clean_error(&out, "fewer than the 5");
    assert!(!none.exists());
}

#[test]
fn loss_spikes_are_skipped_requeued_and_resume_exactly() {
    let _guard = serial();
    let tmp = TempDir::new("spikes");
    let data = builtin_data(&tmp.path().join("data"));
    // A near-still model (tiny learning rate) and a hair-trigger threshold: every batch whose
    // loss is above the trend counts as a spike.
    let config = || {
        let mut c = tiny_moe_run(&data, 30);
        c.train.lr = 1e-4;
        c.train.min_lr = 1e-4;
        c.train.loss_spike_threshold = 1e-3;
        c.train.eval_every = 1000;
        c
    };
    let straight_dir = tmp.path().join("straight");
    let straight = train(options(&straight_dir, config(), false)).unwrap();
    let metrics = std::fs::read_to_string(straight_dir.join("metrics.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| {
            let mut e = r.get("loss_spike")?.clone();
            e["step"] = r["step"].clone();
            Some(e)
        })
        .collect();
    let skipped: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["action"] == "skipped").collect();
    assert!(!skipped.is_empty(), "no spike in {events:?}");
    // Each skipped batch runs again 10 steps later (retried, or updated with a lower LR).
    for s in skipped
        .iter()
        .filter(|s| s["step"].as_u64().unwrap() + 10 <= 30)
    {
        let again = events
            .iter()
            .find(|e| e["action"] != "skipped" && e["data_cursor"] == s["data_cursor"]);
        assert!(again.is_some(), "{s} never ran again: {events:?}");
    }
    // A skipped step leaves the weights alone: its learning rate is logged as 0.
    for s in &skipped {
        let step = s["step"].as_u64().unwrap() as usize;
        assert_eq!(straight.steps[step - 1].lr, 0.0);
    }

    // Stopped half-way and resumed: the same decisions and losses, the same final weights.
    let split_dir = tmp.path().join("split");
    let first = train(TrainOptions {
        stop_at: Some(15),
        ..options(&split_dir, config(), false)
    })
    .unwrap();
    let second = train(options(&split_dir, config(), true)).unwrap();
    let mut resumed = losses(&first);
    resumed.extend(losses(&second));
    assert_eq!(resumed, losses(&straight));
    assert_eq!(
        checkpoint::load_latest(&split_dir).unwrap().state.checksums,
        checkpoint::load_latest(&straight_dir)
            .unwrap()
            .state
            .checksums
    );
}

#[test]
fn stochastic_routing_warm_up_changes_early_routing_and_resumes_exactly() {
    let _guard = serial();
    let tmp = TempDir::new("routing-warmup");
    let data = builtin_data(&tmp.path().join("data"));
    let config = |warmup| {
        let mut c = tiny_moe_run(&data, 6);
        c.train.routing_warmup_steps = warmup;
        c
    };
    let plain = train(options(&tmp.path().join("plain"), config(0), false)).unwrap();
    let straight_dir = tmp.path().join("straight");
    let warm = train(options(&straight_dir, config(4), false)).unwrap();
    // Step 1 routes on noise alone: another expert choice, another loss.
    assert_ne!(warm.steps[0].loss, plain.steps[0].loss);
    assert!(warm.steps.iter().all(|s| s.loss.is_finite()));
    let metrics = std::fs::read_to_string(straight_dir.join("metrics.jsonl")).unwrap();
    let mixes: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["routing_mix"].as_f64())
        .collect();
    assert_eq!(mixes, [0.0, 0.25, 0.5, 0.75]);
    // Interrupted during the warm-up and resumed: the same noise, the same run.
    let split_dir = tmp.path().join("split");
    let first = train(TrainOptions {
        stop_at: Some(2),
        ..options(&split_dir, config(4), false)
    })
    .unwrap();
    let second = train(options(&split_dir, config(4), true)).unwrap();
    let mut resumed = losses(&first);
    resumed.extend(losses(&second));
    assert_eq!(resumed, losses(&warm));
}

/// The fused kernels (attention, RoPE, RMSNorm, SwiGLU, cross-entropy, grouped experts, AdamW)
/// train as their plain Burn compositions do (`NUWA_KERNELS=reference`): the same losses at
/// every step, to float rounding, dense and MoE, through the binary as a user runs it.
#[test]
fn the_kernels_train_as_the_reference_path_does() {
    let dir = TempDir::new("kernels-vs-reference");
    for preset in ["tiny-dense", "tiny-moe"] {
        let curve = |kernels: &str| {
            let run = dir.path().join(format!("{preset}-{kernels}"));
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_nuwa"))
                .env("NUWA_KERNELS", kernels)
                .args([
                    "train",
                    "--preset",
                    preset,
                    "--steps",
                    "40",
                    "--batch-size",
                    "4",
                ])
                .args(["--eval-every", "1000", "--checkpoint-every", "1000"])
                .args(["--sample-tokens", "0", "--quiet", "--run-dir"])
                .arg(&run)
                .output()
                .expect("running nuwa");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v.get("step_seconds").is_some())
                .filter_map(|v| v["loss"].as_f64())
                .collect::<Vec<f64>>()
        };
        let (fused, reference) = (curve("fused"), curve("reference"));
        assert_eq!(fused.len(), 40, "{preset}");
        assert_eq!(fused.len(), reference.len(), "{preset}");
        for (step, (a, b)) in fused.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{preset} step {}: kernels {a}, reference {b}",
                step + 1
            );
        }
        assert!(fused[39] < fused[0], "{preset} did not train: {fused:?}");
    }
}
