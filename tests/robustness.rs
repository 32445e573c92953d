//! A run folder under hostile use, through the binary: two trainers at once, a diverging run,
//! leftovers of killed saves, resumes that would change the run or point at a checkpoint.

mod common;

use common::{assert_clean_error, nuwa, TempDir};
use nuwa_run::checkpoint;
use std::path::Path;

fn tiny(run: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--preset", "tiny-dense", "--eval-every", "1000"];
    args.extend(common::TINY_MODEL);
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

/// `nuwa data prepare` with the byte tokenizer of `text` into `out`, plus `extra` flags.
fn prepare_bytes(text: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "data",
        "prepare",
        "--input",
        text.to_str().unwrap(),
        "--tokenizer",
        "byte",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    nuwa(&args)
}

#[test]
fn data_prepared_again_under_a_run_is_noticed() {
    let tmp = TempDir::new("data-changed");
    let (text, data, run) = (
        tmp.path().join("a.txt"),
        tmp.path().join("data"),
        tmp.path().join("run"),
    );
    let corpus = std::fs::read(common::shakespeare()).unwrap();
    std::fs::write(&text, &corpus[..20_000]).unwrap();
    ok(&prepare_bytes(&text, &data, &[]));
    // A prepared folder is not replaced by accident.
    assert_clean_error(
        &prepare_bytes(&text, &data, &[]),
        "already holds prepared data",
    );
    let d = data.to_str().unwrap();
    ok(&tiny(&run, &["--steps", "2", "--data", d]));

    std::fs::write(&text, &corpus[20_000..40_000]).unwrap();
    ok(&prepare_bytes(&text, &data, &["--force"]));
    let r = run.to_str().unwrap();
    let out = tiny(&run, &["--resume", r, "--steps", "3"]);
    assert_clean_error(&out, "the data changed since");
    assert_clean_error(&out, "--allow-data-change");
    assert_eq!(checkpoint::latest_state(&run).unwrap().step, 2);
    // Said explicitly, the resume goes on, and records the new data.
    let out = tiny(
        &run,
        &["--resume", r, "--steps", "3", "--allow-data-change"],
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming on changed data"));
    let state = checkpoint::latest_state(&run).unwrap();
    assert_eq!(state.step, 3);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        state.data.unwrap().train_sha256,
        manifest["train"]["sha256"].as_str().unwrap()
    );
}

#[test]
fn settings_the_model_cannot_hold_name_the_field() {
    let tmp = TempDir::new("model-limits");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    // Longer sequences than the model has positions: the model's field is named, not val.bin.
    let out = nuwa(&[
        "train",
        "--seq-len",
        "100000",
        "--steps",
        "1",
        "--run-dir",
        r,
    ]);
    assert_clean_error(&out, "max_position_embeddings 256");
    // Zero experts in an MoE model table.
    let file = tmp.path().join("run.toml");
    std::fs::write(
        &file,
        "[model]\nmodel_type = \"bailing_moe\"\nvocab_size = 256\nhidden_size = 32\n\
         intermediate_size = 64\nnum_hidden_layers = 1\nnum_attention_heads = 2\n\
         num_key_value_heads = 2\nmax_position_embeddings = 64\nnum_experts = 0\n\
         num_experts_per_tok = 2\nmoe_intermediate_size = 32\n",
    )
    .unwrap();
    let out = nuwa(&[
        "train",
        "--config",
        file.to_str().unwrap(),
        "--steps",
        "1",
        "--run-dir",
        r,
    ]);
    assert_clean_error(&out, "num_experts");
    assert!(checkpoint::list_checkpoints(&run).is_empty());
}

#[test]
fn the_byte_tokenizer_takes_any_bytes() {
    let tmp = TempDir::new("any-bytes");
    let (file, data) = (tmp.path().join("blob.bin"), tmp.path().join("data"));
    // Every byte value, including ones no UTF-8 text holds.
    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 256) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    ok(&prepare_bytes(&file, &data, &[]));
    let shard = std::fs::read(data.join("train.bin")).unwrap();
    let first: Vec<u8> = shard.chunks(2).take(8).map(|c| c[0]).collect();
    assert_eq!(first, bytes[..8]);
    ok(&tiny(
        &tmp.path().join("run"),
        &["--steps", "1", "--data", data.to_str().unwrap()],
    ));
    // Other tokenizers read text and say which file is not.
    let out = nuwa(&[
        "data",
        "prepare",
        "--input",
        file.to_str().unwrap(),
        "--out",
        tmp.path().join("chars").to_str().unwrap(),
    ]);
    assert_clean_error(&out, "blob.bin: not UTF-8 text");
}

#[test]
fn sample_starts_an_imported_model_from_its_bos_on_the_default_prompt() {
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    let out = nuwa(&[
        "sample",
        "--init-from",
        llama.to_str().unwrap(),
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    ]);
    ok(&out);
    // The fixture's word-level vocabulary: generated words are `wN` or its special tokens.
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.len(), 6, "{text}");
}

#[test]
fn background_checkpoints_hold_what_synchronous_ones_do() {
    let tmp = TempDir::new("async-ckpt");
    let (a, b) = (tmp.path().join("sync"), tmp.path().join("async"));
    let flags = ["--steps", "6", "--checkpoint-every", "2"];
    ok(&tiny(&a, &[&flags[..], &["--sync-checkpoints"]].concat()));
    ok(&tiny(&b, &flags));
    let (ca, cb) = (
        checkpoint::list_checkpoints(&a),
        checkpoint::list_checkpoints(&b),
    );
    assert_eq!(ca.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4, 6]);
    assert_eq!(cb.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4, 6]);
    for ((_, da), (_, db)) in ca.iter().zip(&cb) {
        for file in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
            assert!(
                std::fs::read(da.join(file)).unwrap() == std::fs::read(db.join(file)).unwrap(),
                "{file} differs at {}",
                db.display()
            );
        }
    }
    // Each checkpoint step says how long it held training up.
    let metrics = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let blocked: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["checkpoint_blocked_seconds"].as_f64())
        .collect();
    assert_eq!(blocked.len(), 3);
    assert!(
        blocked.iter().all(|s| (0.0..5.0).contains(s)),
        "{blocked:?}"
    );
}
