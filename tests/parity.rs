//! `nuwa parity`: the same training on two devices (or two paths of one), compared tensor by
//! tensor. On every build: the CPU with its kernels against the CPU with every op on its
//! plain Burn composition, and a deliberately perturbed op located where it was perturbed.
//! With `--features ndarray` / `--features wgpu` (CI builds both, with Mesa's software Vulkan
//! driver installed), the other backends against flex.
#![cfg(feature = "flex")]

mod common;

use common::{assert_clean_error, nuwa, TempDir};
use nuwa_model::trace::Perturbation;
use nuwa_model::ModelConfig;
use nuwa_parity::{run_targets, Kind, Recipe, Target};
use serde_json::Value;

fn recipe(preset: &str, steps: usize) -> Recipe {
    let mut model = ModelConfig::preset(preset).unwrap();
    model.num_hidden_layers = 3;
    Recipe {
        model,
        seed: 7,
        batch_size: 2,
        seq_len: 32,
        steps,
        lr: 1e-3,
        weight_decay: 0.1,
        grad_clip: 1.0,
        aux_loss_coef: 0.015,
        z_loss_coef: 1e-4,
    }
}

fn cpu(name: &str, reference_path: bool) -> Target {
    Target {
        name: name.into(),
        device: burn::tensor::Device::flex(),
        reference_path,
    }
}

#[test]
fn the_kernels_and_the_reference_path_agree_tensor_by_tensor() {
    for preset in ["tiny-dense", "tiny-moe"] {
        let r = recipe(preset, 5);
        let (report, runs) = run_targets(
            &r,
            &[cpu("cpu", false), cpu("cpu-reference", true)],
            None,
            None,
            |_| {},
        )
        .unwrap();
        let pair = &report.pairs[0];
        assert!(pair.ok, "{preset}: {}", report.verdicts()[0]);
        // Everything the step computes was compared: taps of every layer, the router's
        // choices on MoE, a gradient and an updated weight per parameter.
        let count = |k: Kind| pair.entries.iter().filter(|e| e.kind == k).count();
        let params = runs[0]
            .dump
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Weight)
            .count();
        assert!(count(Kind::Forward) >= 3 * 8 + 3, "{preset}");
        assert_eq!(count(Kind::Gradient), params, "{preset}");
        assert_eq!(
            count(Kind::Router),
            if preset == "tiny-moe" { 2 } else { 0 }
        );
        assert_eq!(pair.loss_a.len(), 5);
        // MoE: every step's router choices compared.
        assert_eq!(
            pair.route_flips.len(),
            if preset == "tiny-moe" { 5 } else { 0 }
        );
        // The two paths are different arithmetic, not the same code twice.
        assert!(
            pair.entries.iter().any(|e| e.distance.max_abs > 0.0),
            "{preset}: bit-identical, so nothing was switched"
        );
    }
}

#[test]
fn a_perturbed_op_is_found_where_it_was_perturbed() {
    for (preset, op) in [
        ("tiny-moe", "layers.1.attention.core"),
        ("tiny-moe", "layers.2.moe.gate"),
        ("tiny-dense", "layers.2.mlp"),
        ("tiny-dense", "layers.0.attention.key"),
    ] {
        let r = recipe(preset, 2);
        let perturb = Perturbation {
            name: op.into(),
            delta: 1e-2,
        };
        let (report, _) = run_targets(
            &r,
            &[cpu("cpu", false), cpu("cpu-perturbed", false)],
            None,
            Some((1, perturb)),
            |_| {},
        )
        .unwrap();
        let pair = &report.pairs[0];
        assert!(!pair.ok);
        assert_eq!(
            pair.first_divergence.as_deref(),
            Some(format!("forward {op}").as_str()),
            "{preset}"
        );
        assert!(report.verdicts()[0].contains(op));
    }
}

/// `nuwa parity compare A B --out OUT`.
fn compare_dumps(
    a: impl AsRef<std::path::Path>,
    b: impl AsRef<std::path::Path>,
    out: impl AsRef<std::path::Path>,
) -> std::process::Output {
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let args = [
        "parity".to_string(),
        "compare".to_string(),
        path(a.as_ref()),
        path(b.as_ref()),
        "--out".to_string(),
        path(out.as_ref()),
    ];
    nuwa(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn run_cli(devices: &str, preset: &str, steps: &str, dir: &TempDir) -> Value {
    let out_dir = dir
        .path()
        .join(format!("report-{}", devices.replace([',', ':'], "-")));
    let out = nuwa(&[
        "parity",
        "--devices",
        devices,
        "--preset",
        preset,
        "--steps",
        steps,
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        out_dir.to_str().unwrap(),
        "--dump-dir",
        dir.path().join("dumps").to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{devices} {preset}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("matches"), "{stdout}");
    assert!(out_dir.join("parity.md").is_file());
    assert!(out_dir.join("loss-difference.svg").is_file());
    let json = std::fs::read_to_string(out_dir.join("parity.json")).unwrap();
    serde_json::from_str(&json).unwrap()
}

#[test]
fn the_command_reports_and_its_dumps_compare_again() {
    let dir = TempDir::new("parity-cli");
    let report = run_cli("cpu,cpu-reference", "tiny-moe", "3", &dir);
    assert_eq!(report["pairs"][0]["ok"], Value::Bool(true));
    assert_eq!(report["pairs"][0]["loss_a"].as_array().unwrap().len(), 3);

    // The dumps it wrote, compared on their own, agree the same way.
    let dumps = dir.path().join("dumps");
    let (a, b) = (dumps.join("cpu-reference"), dumps.join("cpu"));
    let out_dir = dir.path().join("compare");
    let out = compare_dumps(&a, &b, &out_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("matches"));

    // A dump of another model does not match: the command says where they part and fails.
    let moe = dir.path().join("moe");
    std::fs::rename(&b, &moe).unwrap();
    run_cli("cpu,cpu-reference", "tiny-dense", "1", &dir);
    let report = dir.path().join("report-mixed");
    let out = compare_dumps(&b, &moe, &report);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("part first at"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Bad input: one clear line.
    std::fs::write(a.join("tensors.safetensors"), b"truncated").unwrap();
    let out = compare_dumps(&a, &b, &report);
    assert_clean_error(&out, "tensors.safetensors");
    let out = nuwa(&["parity", "--devices", "cpu"]);
    assert_clean_error(&out, "--devices");
    let out = nuwa(&["parity", "--devices", "cpu,tpu:0"]);
    assert_clean_error(&out, "tpu");
}

/// The other CPU backend, executed: every tensor of a step and 20 steps' losses against flex.
#[cfg(feature = "ndarray")]
#[test]
fn ndarray_trains_as_flex_does() {
    let dir = TempDir::new("parity-ndarray");
    for preset in ["tiny-dense", "tiny-moe"] {
        let report = run_cli("cpu,ndarray", preset, "20", &dir);
        assert_eq!(report["pairs"][0]["ok"], Value::Bool(true), "{preset}");
    }
}

/// wgpu (on a machine without a GPU: Mesa's software Vulkan driver) against flex.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_trains_as_flex_does() {
    let dir = TempDir::new("parity-wgpu");
    for preset in ["tiny-dense", "tiny-moe"] {
        let report = run_cli("cpu,wgpu:0", preset, "20", &dir);
        assert_eq!(report["pairs"][0]["ok"], Value::Bool(true), "{preset}");
    }
}

fn losses(run: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect()
}

#[test]
fn dumps_and_parity_checks_in_a_training_run_leave_the_training_unchanged() {
    let dir = TempDir::new("parity-train");
    let train = |name: &str, extra: &[&str]| {
        let run = dir.path().join(name);
        let mut args = vec![
            "train",
            "--preset",
            "tiny-moe",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--quiet",
            "--sample-tokens",
            "0",
            "--run-dir",
            run.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = nuwa(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        run
    };
    let plain = train("plain", &[]);
    let dumped = train("dumped", &["--dump-tensors", "1,3"]);
    let checked = train("checked", &["--parity-every", "2"]);
    assert_eq!(losses(&plain), losses(&dumped));
    assert_eq!(losses(&plain), losses(&checked));
    assert_eq!(losses(&plain).len(), 4);

    // Steps 2 and 4 carry the divergence from the reference path, within tolerance.
    let records: Vec<Value> = std::fs::read_to_string(checked.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v.get("loss").is_some())
        .collect();
    let checks: Vec<&Value> = records
        .iter()
        .filter(|r| r.get("parity_ok").is_some())
        .collect();
    assert_eq!(checks.len(), 2);
    for c in checks {
        assert_eq!(c["parity_ok"], Value::Bool(true), "{c}");
        assert_eq!(c["parity_device"], "cpu-reference");
        let g = c["parity_gradient_max"].as_f64().unwrap();
        assert!(g > 0.0 && g < 1e-3, "{c}");
    }

    // The dumps hold the steps asked for, and the same step dumped twice compares equal.
    let d1 = dumped.join("dumps/step-00000001");
    assert!(dumped.join("dumps/step-00000003/dump.json").is_file());
    assert!(!dumped.join("dumps/step-00000002").exists());
    let again = train("again", &["--dump-tensors", "1"]);
    let out = compare_dumps(
        &d1,
        again.join("dumps/step-00000001"),
        dir.path().join("report"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let bad = dir.path().join("bad");
    let out = nuwa(&[
        "train",
        "--dump-tensors",
        "0",
        "--run-dir",
        bad.to_str().unwrap(),
    ]);
    assert_clean_error(&out, "--dump-tensors 0");
    let out = nuwa(&["train", "--parity-every", "2", "--parity-device", "tpu:0"]);
    assert_clean_error(&out, "--parity-device");
    assert!(!bad.exists(), "a refused run leaves nothing behind");
}

#[test]
fn flex_repeats_itself_bit_for_bit() {
    let dir = TempDir::new("parity-det");
    let out = nuwa(&[
        "parity",
        "--deterministic",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(dir.path().join("parity.json")).unwrap();
    let report: Value = serde_json::from_str(&json).unwrap();
    let runs = report["determinism"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for d in runs {
        assert_eq!(d["differing"], 0, "{d}");
        assert!(d["elements"].as_u64().unwrap() > 100_000, "{d}");
        assert_eq!(d["losses_equal"], Value::Bool(true), "{d}");
    }
}
