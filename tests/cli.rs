//! The `nuwa` binary as a user meets it: bad input gets one clear error line and a non-zero
//! exit, never a panic; a trained run samples reproducibly; `inspect` counts Ling's sizes.

mod common;

use common::{assert_clean_error, nuwa, shakespeare, TempDir};
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn prepared(dir: &Path) {
    let out = nuwa(&["data", "prepare", "--out", s(dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Arguments of a quick training run of a one-layer, 32-wide model.
fn tiny_train_args<'a>(data: &'a Path, run: &'a Path, steps: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--data",
        s(data),
        "--run-dir",
        s(run),
        "--steps",
        steps,
    ];
    args.extend(common::TINY_MODEL);
    args
}

fn tiny_train(data: &Path, run: &Path, steps: &str) -> std::process::Output {
    nuwa(&tiny_train_args(data, run, steps))
}

#[test]
fn unknown_config_keys_are_named() {
    let tmp = TempDir::new("keys");
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, "preset = \"tiny-dense\"\n[train]\nstepz = 3\n").unwrap();
    assert_clean_error(&nuwa(&["train", "--config", s(&cfg)]), "stepz");
    std::fs::write(
        &cfg,
        "[model]\nvocab_size = 10\nhidden_size = 8\nintermediate_size = 8\nnum_hidden_layers = 1\n\
         num_attention_heads = 2\nnum_key_value_heads = 1\nmax_position_embeddings = 8\nn_embd = 4\n",
    )
    .unwrap();
    assert_clean_error(&nuwa(&["train", "--config", s(&cfg)]), "n_embd");
}

#[test]
fn shapes_that_do_not_divide_are_named() {
    let tmp = TempDir::new("shapes");
    let cases = [
        (
            r#""num_attention_heads": 3, "num_key_value_heads": 1"#,
            "num_attention_heads",
        ),
        (
            r#""num_attention_heads": 4, "num_key_value_heads": 3"#,
            "num_key_value_heads",
        ),
        (
            r#""num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 5, "moe_intermediate_size": 8"#,
            "num_experts_per_tok",
        ),
    ];
    for (i, (fields, needle)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("config{i}.json"));
        let json = format!(
            r#"{{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
                "max_position_embeddings": 64, {fields}}}"#
        );
        std::fs::write(&path, json).unwrap();
        assert_clean_error(&nuwa(&["inspect", "--model-config", s(&path)]), needle);
        assert_clean_error(
            &nuwa(&[
                "train",
                "--model-config",
                s(&path),
                "--run-dir",
                s(&tmp.path().join("r")),
            ]),
            needle,
        );
    }
}

#[test]
fn broken_data_is_reported() {
    let tmp = TempDir::new("data");
    let missing = tmp.path().join("nope");
    assert_clean_error(
        &nuwa(&[
            "train",
            "--data",
            s(&missing),
            "--run-dir",
            s(&tmp.path().join("r0")),
        ]),
        "manifest",
    );

    let data = tmp.path().join("data");
    prepared(&data);
    let shard = data.join("train.bin");
    let good = std::fs::read(&shard).unwrap();

    // Truncated shard.
    std::fs::write(&shard, &good[..good.len() - 10]).unwrap();
    assert_clean_error(&tiny_train(&data, &tmp.path().join("r1"), "2"), "truncated");

    // Same length, one byte flipped.
    let mut flipped = good.clone();
    flipped[100] ^= 0x01;
    std::fs::write(&shard, &flipped).unwrap();
    assert_clean_error(
        &tiny_train(&data, &tmp.path().join("r2"), "2"),
        "checksum mismatch",
    );

    // A token id beyond the vocabulary, with a matching checksum.
    let mut bad_id = good.clone();
    bad_id[0] = 0xff;
    bad_id[1] = 0x7f;
    std::fs::write(&shard, &bad_id).unwrap();
    let manifest_path = data.join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    m["train"]["sha256"] = serde_json::json!(nuwa_core::sha256_hex(&bad_id));
    std::fs::write(&manifest_path, m.to_string()).unwrap();
    assert_clean_error(
        &tiny_train(&data, &tmp.path().join("r3"), "2"),
        "out of range",
    );

    // Garbled manifest.
    std::fs::write(&manifest_path, "{ not json").unwrap();
    assert_clean_error(
        &tiny_train(&data, &tmp.path().join("r4"), "2"),
        "garbled manifest",
    );

    // Input that is not text.
    let binary = tmp.path().join("blob.txt");
    std::fs::write(&binary, [0x66, 0x6f, 0xff, 0xfe, 0x00]).unwrap();
    assert_clean_error(
        &nuwa(&[
            "data",
            "prepare",
            "--input",
            s(&binary),
            "--out",
            s(&tmp.path().join("d2")),
        ]),
        "not UTF-8",
    );
}

#[test]
fn corrupted_checkpoint_is_refused_and_left_alone() {
    let tmp = TempDir::new("ckpt");
    let data = tmp.path().join("data");
    prepared(&data);
    let run = tmp.path().join("run");
    let out = tiny_train(&data, &run, "2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = run.join("checkpoints/step-00000002/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let resume = nuwa(&[
        "train",
        "--resume",
        s(&run),
        "--steps",
        "4",
        "--quiet",
        "--sample-tokens",
        "0",
    ]);
    assert_clean_error(&resume, "checksum mismatch");
    assert_eq!(
        std::fs::read(&weights).unwrap().len(),
        bytes.len() / 2,
        "checkpoint was touched"
    );
    assert_clean_error(&nuwa(&["sample", "--run", s(&run)]), "checksum mismatch");

    // A fresh run into a folder that already has checkpoints is refused, not overwritten.
    assert_clean_error(&tiny_train(&data, &run, "2"), "--resume");
    assert_clean_error(
        &nuwa(&["sample", "--run", s(&tmp.path().join("empty"))]),
        "no checkpoint",
    );
}

#[test]
fn devices_and_presets_are_checked() {
    #[cfg(not(feature = "cuda"))]
    assert_clean_error(
        &nuwa(&["sample", "--run", ".", "--device", "cuda:0"]),
        "--features cuda",
    );
    assert_clean_error(
        &nuwa(&["train", "--device", "tpu:0"]),
        "unknown device kind",
    );
    assert_clean_error(
        &nuwa(&["inspect", "--preset", "ling-huge"]),
        "unknown preset",
    );
    assert_clean_error(&nuwa(&["sample", "--run", ".", "--top-p", "0"]), "--top-p");
    // Too large for a duration: refused, not a panic in Duration::from_secs_f64.
    assert_clean_error(
        &nuwa(&["train", "--collective-timeout", "1e30"]),
        "--collective-timeout",
    );
}

#[test]
fn inspect_prints_ling_sizes() {
    let lite = String::from_utf8(nuwa(&["inspect", "--preset", "ling-lite"]).stdout).unwrap();
    assert!(lite.contains("total params     16.80"), "{lite}");
    assert!(lite.contains("active params    2.75"), "{lite}");
    let plus = String::from_utf8(nuwa(&["inspect", "--preset", "ling-plus"]).stdout).unwrap();
    assert!(plus.contains("total params     290."), "{plus}");
    assert!(
        plus.contains("active params    29.0") || plus.contains("active params    28.8"),
        "{plus}"
    );
}

#[test]
fn trained_run_samples_reproducibly_with_bpe_data() {
    let tmp = TempDir::new("sample");
    let data = tmp.path().join("data");
    let out = nuwa(&[
        "data",
        "prepare",
        "--input",
        s(&shakespeare()),
        "--tokenizer",
        "bpe:400",
        "--out",
        s(&data),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["vocab_size"], 400);
    assert!(data.join("tokenizer.json").exists());

    let run = tmp.path().join("run");
    let out = tiny_train(&data, &run, "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sample = |seed: &str| {
        let out = nuwa(&[
            "sample",
            "--run",
            s(&run),
            "--prompt",
            "ROMEO:",
            "--max-tokens",
            "30",
            "--seed",
            seed,
            "--temperature",
            "1.0",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let a = sample("1");
    assert!(a.starts_with("ROMEO:") && a.len() > 10, "{a:?}");
    assert_eq!(a, sample("1"));
    assert_ne!(a, sample("2"));
}

/// Ctrl-C (SIGINT) and what systemd, Docker and Kubernetes send (SIGTERM): the step ends, a
/// checkpoint of it is written (in the background, waited for), and the run exits 0.
#[test]
fn ctrl_c_and_sigterm_save_a_checkpoint_and_exit() {
    let tmp = TempDir::new("signals");
    let data = tmp.path().join("data");
    prepared(&data);
    for signal in ["INT", "TERM"] {
        let run = tmp.path().join(format!("run-{signal}"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_nuwa"))
            .args(tiny_train_args(&data, &run, "100000"))
            .args(["--checkpoint-every", "100000"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let metrics = run.join("metrics.jsonl");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "training did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "SIG{signal}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let steps = std::fs::read_to_string(&metrics).unwrap().lines().count() as u64;
        let checkpoints = nuwa_run::checkpoint::list_checkpoints(&run);
        assert_eq!(
            checkpoints.last().map(|c| c.0),
            Some(steps),
            "SIG{signal}: checkpoint of the last step"
        );
        assert_eq!(
            nuwa_run::checkpoint::remove_leftovers(&run),
            0,
            "SIG{signal}: a temporary folder was left"
        );
    }
}
