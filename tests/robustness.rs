//! A run folder under hostile use, through the binary: two trainers at once, a diverging run,
//! leftovers of killed saves, resumes that would change the run or point at a checkpoint.

mod common;

use common::{assert_clean_error, nuwa, TempDir};
use nuwa_run::checkpoint;
use std::path::Path;

fn tiny(run: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--preset",
        "tiny-dense",
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--quiet",
        "--sample-tokens",
        "0",
        "--eval-every",
        "1000",
    ];
    let run = run.to_str().unwrap();
    if !extra.contains(&"--resume") {
        args.extend(["--run-dir", run]);
    }
    args.extend(extra);
    nuwa(&args)
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_run_folder_in_use_is_refused() {
    let tmp = TempDir::new("locked");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let held = std::fs::File::create(run.join(".lock")).unwrap();
    held.try_lock().unwrap();
    let out = tiny(&run, &["--steps", "2"]);
    assert_clean_error(&out, "another nuwa process is training this run folder");
    assert!(checkpoint::list_checkpoints(&run).is_empty());
    drop(held);
    ok(&tiny(&run, &["--steps", "2"]));
}

#[test]
fn a_diverging_run_stops_without_writing_a_poisoned_checkpoint() {
    let tmp = TempDir::new("diverge");
    let run = tmp.path().join("run");
    let out = tiny(
        &run,
        &["--steps", "8", "--lr", "1e30", "--checkpoint-every", "1"],
    );
    assert_clean_error(&out, "stopping");
    for (_, dir) in checkpoint::list_checkpoints(&run) {
        let loaded = checkpoint::load_latest(&dir).unwrap();
        for (name, t) in &loaded.weights {
            assert!(
                t.data.iter().all(|x| x.is_finite()),
                "{}: {name}",
                dir.display()
            );
        }
    }
}

#[test]
fn leftovers_go_and_resumes_keep_the_run_as_it_was() {
    let tmp = TempDir::new("resume-rules");
    let run = tmp.path().join("run");
    ok(&tiny(&run, &["--steps", "2"]));
    // A killed save's temporary folder is removed when the run resumes.
    let leftover = run.join("checkpoints/.tmp-step-00000009-4242");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("model.safetensors"), b"half").unwrap();
    let r = run.to_str().unwrap();
    ok(&tiny(&run, &["--resume", r, "--steps", "3"]));
    assert!(!leftover.exists());
    // A flag that would change the run is refused, naming it and the run's value.
    let out = tiny(&run, &["--resume", r, "--steps", "4", "--lr", "0.5"]);
    assert_clean_error(&out, "--lr (the run has");
    // Fewer steps than the run has done: nothing to do, said so.
    let out = tiny(&run, &["--resume", r, "--steps", "1"]);
    assert_clean_error(&out, "already at step 3");
    // A checkpoint folder is not a run folder.
    let (_, ckpt) = checkpoint::list_checkpoints(&run).pop().unwrap();
    let out = tiny(&run, &["--resume", ckpt.to_str().unwrap(), "--steps", "4"]);
    assert_clean_error(&out, "is a checkpoint, not a run folder");
    assert_eq!(checkpoint::latest_state(&run).unwrap().step, 3);
}

#[test]
fn bad_settings_name_the_field_before_anything_runs() {
    let tmp = TempDir::new("bad-settings");
    let run = tmp.path().join("run");
    for (flags, needle) in [
        (vec!["--weight-decay=-5"], "train.weight_decay"),
        (vec!["--grad-clip=-1"], "train.grad_clip"),
        (
            vec!["--warmup-steps", "18446744073709551615"],
            "train.warmup_steps",
        ),
        (vec!["--device", "cpu:7"], "--device cpu:7"),
    ] {
        let mut args = vec!["--steps", "2"];
        args.extend(flags);
        assert_clean_error(&tiny(&run, &args), needle);
        assert!(checkpoint::list_checkpoints(&run).is_empty());
    }
    // An empty input names the file it read.
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = nuwa(&[
        "data",
        "prepare",
        "--input",
        empty.to_str().unwrap(),
        "--tokenizer",
        "byte",
        "--out",
        tmp.path().join("data").to_str().unwrap(),
    ]);
    assert_clean_error(&out, "empty.txt");
}

#[test]
fn a_run_too_big_for_memory_is_refused_before_allocating() {
    let tmp = TempDir::new("too-big");
    let run = tmp.path().join("run");
    for (flags, needle) in [
        (
            vec!["train", "--preset", "ling-plus"],
            "the model (289243567872 parameters",
        ),
        (vec!["train", "--layers", "1000000"], "over 1000000 layers"),
        (
            vec!["train", "--batch-size", "100000000"],
            "--batch-size 100000000",
        ),
    ] {
        let mut args = flags;
        let r = run.to_str().unwrap();
        args.extend([
            "--steps",
            "1",
            "--quiet",
            "--sample-tokens",
            "0",
            "--run-dir",
            r,
        ]);
        let out = nuwa(&args);
        assert_clean_error(&out, needle);
        assert_clean_error(&out, "of memory is available");
        assert!(checkpoint::list_checkpoints(&run).is_empty());
    }
}
