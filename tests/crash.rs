//! The crash-and-fault trial: SIGKILL training at random moments — mid-step, while a
//! checkpoint is written in the background, while a resume loads — resume each time, and
//! demand final weights bit-identical to a run never interrupted.
//!
//! CI runs a short version; `NUWA_CRASH_TRIALS=30 cargo test --release --test crash -- --nocapture`
//! runs more kills and prints the table of what each one hit.

mod common;

use common::{nuwa, TempDir};
use nuwa_core::rng::splitmix64;
use nuwa_run::checkpoint;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const STEPS: &str = "30";

fn train_args<'a>(run: &'a str, data: &'a str, resume: bool) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--preset",
        "tiny-moe",
        "--hidden-size",
        "128",
        "--layers",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--steps",
        STEPS,
        "--checkpoint-every",
        "2",
        "--eval-every",
        "10",
        "--quiet",
        "--sample-tokens",
        "0",
        "--data",
        data,
    ];
    args.extend(if resume {
        ["--resume", run]
    } else {
        ["--run-dir", run]
    });
    args
}

/// SHA-256 of the final checkpoint's files, from its trainer.json.
fn final_checksums(run: &Path) -> std::collections::BTreeMap<String, String> {
    let state = checkpoint::latest_state(run).unwrap();
    assert_eq!(state.step.to_string(), STEPS, "{}", run.display());
    state.checksums
}

/// Lines in the run's metrics.jsonl (one per step it trained).
fn steps_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count())
}

/// What the kill interrupted, judged from the run folder it left and whether any step was
/// logged since the process started.
fn what_was_hit(run: &Path, stepped: bool) -> &'static str {
    let tmp = std::fs::read_dir(checkpoint::checkpoints_dir(run))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"));
    match (tmp, stepped) {
        (true, _) => "a background checkpoint write",
        (false, true) => "a training step",
        (false, false) => "start-up or resume, before a step",
    }
}

#[test]
fn killed_at_random_moments_a_run_resumes_bit_identical() {
    let trials: usize = std::env::var("NUWA_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let tmp = TempDir::new("crash");
    let data = tmp.path().join("data");
    let prepared = nuwa(&[
        "data",
        "prepare",
        "--input",
        common::shakespeare().to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(prepared.status.success());
    let d = data.to_str().unwrap();

    // The run never interrupted, timed to place the kills.
    let reference = tmp.path().join("reference");
    let start = Instant::now();
    let out = nuwa(&train_args(reference.to_str().unwrap(), d, false));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = start.elapsed();

    let run = tmp.path().join("crashed");
    let r = run.to_str().unwrap();
    let mut seed = 0x6b696c6cu64;
    let mut table = Vec::new();
    for trial in 0..trials {
        let resume = !checkpoint::list_checkpoints(&run).is_empty();
        let logged = steps_logged(&run);
        let mut child = Command::new(env!("CARGO_BIN_EXE_nuwa"))
            .args(train_args(r, d, resume))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // A moment within what is left of the run (resumes have less to do).
        let newest = checkpoint::list_checkpoints(&run).last().map_or(0, |c| c.0);
        let left = 1.0 - newest as f64 / STEPS.parse::<f64>().unwrap();
        seed = splitmix64(seed);
        let uniform = (seed >> 11) as f64 / (1u64 << 53) as f64;
        let at = whole.mul_f64((0.05 + 0.9 * uniform) * left.max(0.3));
        std::thread::sleep(at);
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let hit = if finished {
            "nothing (it had finished)"
        } else {
            what_was_hit(&run, steps_logged(&run) > logged)
        };
        let step = checkpoint::list_checkpoints(&run).last().map_or(0, |c| c.0);
        table.push(format!(
            "| {trial} | {:.2} s | {hit} | {step} |",
            at.as_secs_f64()
        ));
        if finished {
            // Start the crashed run again from scratch, so the kills keep landing mid-run.
            std::fs::remove_dir_all(&run).unwrap();
        }
    }
    // Resume to the end, as a user would after the last crash.
    let resume = !checkpoint::list_checkpoints(&run).is_empty();
    let out = nuwa(&train_args(r, d, resume));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("| kill | after | what it hit | newest checkpoint left |\n|---|---|---|---|");
    println!("{}", table.join("\n"));
    assert_eq!(final_checksums(&run), final_checksums(&reference));
    assert_eq!(
        checkpoint::remove_leftovers(&run),
        0,
        "a resume left a temporary folder"
    );
}
