//! Data-parallel training over MPI (built with `--features mpi`; needs Open MPI's `mpirun`):
//! the same math on 1, 2 and 3 ranks as in one process, throughput balancing of a throttled
//! rank, and recovery from a rank killed with SIGKILL with no sample lost or repeated.
#![cfg(feature = "mpi")]

mod common;

use common::TempDir;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const NUWA: &str = env!("CARGO_BIN_EXE_nuwa");

/// One MPI job at a time: the timing-based tests (balancing, stragglers) need the cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny_args(run: &Path, steps: &str) -> Vec<String> {
    sized_args(run, steps, "6", "32")
}

fn sized_args(run: &Path, steps: &str, batch: &str, hidden: &str) -> Vec<String> {
    [
        "--preset",
        "tiny-dense",
        "--hidden-size",
        hidden,
        "--layers",
        "2",
        "--steps",
        steps,
        "--batch-size",
        batch,
        "--seq-len",
        "16",
        "--lr",
        "3e-3",
        "--quiet",
        "--sample-tokens",
        "0",
        "--eval-every",
        "1000",
        "--run-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([run.display().to_string()])
    .collect()
}

fn mpirun(np: usize, args: &[String]) {
    let out = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-np",
            &np.to_string(),
            "-x",
            "RAYON_NUM_THREADS",
            NUWA,
        ])
        .args(["train", "--dist", "mpi"])
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("running mpirun (install openmpi-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `nuwa launch --np N -- ARGS`, which must succeed; returns its stderr.
fn launch(np: usize, args: &[String]) -> String {
    let out = Command::new(NUWA)
        .args(["launch", "--np", &np.to_string()])
        .args(["--mpirun-arg=-x", "--mpirun-arg=RAYON_NUM_THREADS", "--"])
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// The metrics of a run, one record per step (the last one written for a step wins, as a
/// restarted run logs again the steps after its checkpoint).
fn metrics(run: &Path) -> BTreeMap<u64, Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v))
        .collect()
}

/// Asserts `key` of a step's record is within 1e-5 of one process's at the same step.
fn assert_close(got: &Value, one_process: &Value, key: &str, what: String) {
    let value = |r: &Value| {
        r[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: no {key} in {r}"))
    };
    let (a, b) = (value(got), value(one_process));
    assert!((a - b).abs() < 1e-5, "{what}: {key} {a} vs one process {b}");
}

/// Trains without MPI (the reference run) and returns its per-step metrics.
fn one_process(args: &[String], run: &Path) -> BTreeMap<u64, Value> {
    let out = Command::new(NUWA)
        .arg("train")
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    metrics(run)
}

#[test]
fn one_two_and_three_ranks_compute_the_same_steps_as_one_process() {
    let _serial = serial();
    let tmp = TempDir::new("dist-same");
    let single = tmp.path().join("single");
    let reference = one_process(&tiny_args(&single, "8"), &single);
    // Uneven shares on purpose: rank 1 throttled, re-balanced every 2 steps.
    for (np, throttle) in [(1, "1"), (2, "1,3"), (3, "1,2,1")] {
        let run = tmp.path().join(format!("np{np}"));
        let mut args = tiny_args(&run, "8");
        args.extend(
            [
                "--hash-params",
                "--rebalance-every",
                "2",
                "--throttle",
                throttle,
            ]
            .map(String::from),
        );
        mpirun(np, &args);
        let got = metrics(&run);
        assert_eq!(got.len(), reference.len());
        for (step, rec) in &got {
            assert_close(
                rec,
                &reference[step],
                "loss",
                format!("np {np} step {step}"),
            );
            let hashes = rec["param_hashes"].as_array().unwrap();
            assert_eq!(hashes.len(), np);
            assert!(
                hashes.iter().all(|h| h == &hashes[0]),
                "np {np} step {step}: {hashes:?}"
            );
            let seqs: f64 = rec["ranks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["seqs"].as_f64().unwrap())
                .sum();
            assert_eq!(seqs, 6.0, "the global batch is fixed");
        }
    }
}

#[test]
fn moe_load_balance_loss_is_the_global_batchs_on_uneven_shares() {
    let _serial = serial();
    let tmp = TempDir::new("dist-moe");
    let moe_args = |run: &Path| moe_sized_args(run, "6", "6", "32");
    let single = tmp.path().join("single");
    let reference = one_process(&moe_args(&single), &single);
    let run = tmp.path().join("np2");
    let mut args = moe_args(&run);
    args.extend(
        [
            "--hash-params",
            "--rebalance-every",
            "2",
            "--throttle",
            "1,3",
        ]
        .map(String::from),
    );
    mpirun(2, &args);
    let got = metrics(&run);
    assert_eq!(got.len(), reference.len());
    let mut uneven = false;
    for (step, rec) in &got {
        // The load-balance loss is nonlinear in the batch: averaged per rank it would differ.
        for key in ["loss", "load_balance_loss", "z_loss"] {
            assert_close(rec, &reference[step], key, format!("step {step}"));
        }
        let hashes = rec["param_hashes"].as_array().unwrap();
        assert!(
            hashes.iter().all(|h| h == &hashes[0]),
            "step {step}: {hashes:?}"
        );
        uneven |= rec["ranks"][0]["seqs"] != rec["ranks"][1]["seqs"];
    }
    assert!(uneven, "the shares never became uneven");
}

/// Three ranks of unequal speed laid end to end over a step of 3 micro-batches: each meets
/// only the ranks sharing a micro-batch with it for the load-balance loss's expert counts
/// (two of the three), and the step is still one process's.
#[test]
fn moe_ranks_meeting_only_over_the_micro_batches_they_share_train_as_one_process() {
    let _serial = serial();
    let tmp = TempDir::new("dist-moe-packed");
    let moe_args = |run: &Path| -> Vec<String> {
        let mut args = moe_sized_args(run, "6", "4", "32");
        args.extend(["--grad-accum", "3"].map(String::from));
        args
    };
    let single = tmp.path().join("single");
    let reference = one_process(&moe_args(&single), &single);
    let run = tmp.path().join("np3");
    let mut args = moe_args(&run);
    args.extend(["--rebalance-every", "2", "--throttle", "1,2,4"].map(String::from));
    mpirun(3, &args);
    let got = metrics(&run);
    assert_eq!(got.len(), reference.len());
    let mut partial = false;
    for (step, rec) in &got {
        for key in ["loss", "load_balance_loss", "z_loss"] {
            assert_close(rec, &reference[step], key, format!("step {step}"));
        }
        // Which ranks hold rows of each micro-batch of 4, the ranks laid end to end.
        let seqs: Vec<usize> = (0..3)
            .map(|r| rec["ranks"][r]["seqs"].as_f64().unwrap() as usize)
            .collect();
        let mut start = 0;
        let ranges: Vec<(usize, usize)> = seqs
            .iter()
            .map(|&n| {
                start += n;
                (start - n, start)
            })
            .collect();
        for m in 0..3 {
            let holders = ranges
                .iter()
                .filter(|&&(a, b)| b.min(4 * m + 4) > a.max(4 * m))
                .count();
            partial |= holders == 2;
        }
    }
    assert!(partial, "no micro-batch was shared by two ranks of three");
    let diff = weights_differ_by(&run, &single);
    assert!(diff < 1e-5, "weights differ by {diff}");
}

#[test]
fn ling_2_expert_biases_follow_the_global_load_on_every_rank() {
    let _serial = serial();
    let tmp = TempDir::new("dist-aux-free");
    // Ling 2.0's shapes shrunk: sigmoid group-limited routing over 256 experts with expert
    // biases moved after every step by the load of the whole batch, all ranks together.
    let args = |run: &Path| -> Vec<String> {
        let mut args = tiny_args(run, "4");
        args[1] = "ling-mini-2".into();
        args
    };
    let single = tmp.path().join("single");
    let reference = one_process(&args(&single), &single);
    let run = tmp.path().join("np2");
    let mut np2 = args(&run);
    np2.push("--hash-params".into());
    mpirun(2, &np2);
    let got = metrics(&run);
    assert_eq!(got.len(), reference.len());
    for (step, rec) in &got {
        assert_eq!(
            rec["expert_load"], reference[step]["expert_load"],
            "step {step}"
        );
        assert_close(rec, &reference[step], "loss", format!("step {step}"));
        let hashes = rec["param_hashes"].as_array().unwrap();
        assert!(
            hashes.iter().all(|h| h == &hashes[0]),
            "step {step}: {hashes:?}"
        );
    }
}

#[test]
fn a_slower_rank_gets_a_smaller_share() {
    let _serial = serial();
    let tmp = TempDir::new("dist-balance");
    let run = tmp.path().join("run");
    let mut args = sized_args(&run, "8", "12", "128");
    args.extend(["--rebalance-every", "2", "--throttle", "1,3"].map(String::from));
    mpirun(2, &args);
    let last = metrics(&run).into_values().last().unwrap();
    let ranks = last["ranks"].as_array().unwrap();
    let (fast, slow) = (
        ranks[0]["seqs"].as_f64().unwrap(),
        ranks[1]["seqs"].as_f64().unwrap(),
    );
    assert!(
        fast >= 2.0 * slow,
        "rank 0 (3x faster) should take most of the batch: {fast} vs {slow}"
    );
    assert_eq!(fast + slow, 12.0);
}

#[test]
fn a_killed_rank_is_recovered_without_losing_or_repeating_samples() {
    let _serial = serial();
    let tmp = TempDir::new("dist-kill");
    let run = tmp.path().join("run");
    let mut args = tiny_args(&run, "10");
    args.extend(["--checkpoint-every", "2", "--fault-kill-at", "5:1"].map(String::from));
    let stderr = launch(3, &args);
    assert!(
        stderr.contains("restarting from checkpoint step 4 on 2 rank(s)"),
        "{stderr}"
    );
    let steps = metrics(&run);
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    // Every sample id of the 10 global batches of 6, exactly once.
    let mut ids: Vec<u64> = steps
        .values()
        .flat_map(|r| {
            let start = r["sample_start"].as_u64().unwrap();
            start..start + r["sample_count"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..60).collect::<Vec<_>>());
    assert_eq!(steps[&4]["ranks"].as_array().unwrap().len(), 3);
    assert_eq!(
        steps[&5]["ranks"].as_array().unwrap().len(),
        2,
        "steps after the restart run on 2 ranks"
    );
}

/// The pid of a child of `parent` named `name` (from /proc), once there is one.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let ppid: u32 = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && &stat[open + 1..close] == name).then_some(pid)
    })
}

#[test]
fn ranks_left_running_by_a_killed_mpirun_are_stopped_before_the_restart() {
    let _serial = serial();
    let tmp = TempDir::new("dist-kill-mpirun");
    let run = tmp.path().join("run");
    let mut args = tiny_args(&run, "1000");
    args.extend(["--checkpoint-every", "2"].map(String::from));
    let launch = Command::new(NUWA)
        .args(["launch", "--np", "2", "--max-restarts", "1"])
        .args(["--mpirun-arg=-x", "--mpirun-arg=RAYON_NUM_THREADS", "--"])
        .args(&args)
        .env("RAYON_NUM_THREADS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the job has a checkpoint, mpirun dies (its ranks, each in a process group of its
    // own, do not).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let saved = || std::fs::read_dir(run.join("checkpoints")).is_ok_and(|mut d| d.next().is_some());
    while !saved() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mpirun = child_named(launch.id(), "mpirun").expect("mpirun under nuwa launch");
    let killed = Command::new("sh")
        .args(["-c", &format!("kill -9 {mpirun}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = launch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Without stopping them, the orphaned ranks kept the run folder's lock and the restart
    // failed ("another nuwa process ... is training this run folder").
    // (Left running, they are waited for a few seconds, then killed.)
    assert!(out.status.success(), "{stderr}");
    let steps = metrics(&run);
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (1..=1000).collect::<Vec<_>>()
    );
}

#[test]
fn a_rank_that_slows_down_is_named_a_straggler() {
    let _serial = serial();
    let tmp = TempDir::new("dist-straggler");
    let run = tmp.path().join("run");
    let mut args = sized_args(&run, "10", "12", "128");
    // Rank 1 becomes 4x slower at step 5; no re-balancing after the first step hides it.
    args.extend(
        [
            "--rebalance-every",
            "1000",
            "--throttle",
            "1,4",
            "--throttle-from",
            "5",
        ]
        .map(String::from),
    );
    mpirun(2, &args);
    let steps = metrics(&run);
    assert!(
        steps[&3]["stragglers"].as_array().unwrap().is_empty(),
        "{}",
        steps[&3]
    );
    let flagged: Vec<u64> = steps
        .iter()
        .filter(|(_, r)| r["stragglers"].as_array().unwrap().iter().any(|s| s == 1))
        .map(|(s, _)| *s)
        .collect();
    // Three slow steps in a row name it (from step 7), and it stays named while slow.
    assert!(
        [8, 9, 10].iter().all(|s| flagged.contains(s)),
        "flagged at {flagged:?}"
    );
    // Over the slow steps (summed, so one noisy step cannot decide it) rank 1 took well over
    // twice as long per sequence as rank 0.
    let compute = |rank: usize| -> f64 {
        (8..=10)
            .map(|s| {
                let r = &steps[&s]["ranks"][rank];
                r["compute_s"].as_f64().unwrap() / r["seqs"].as_f64().unwrap()
            })
            .sum()
    };
    assert!(
        compute(1) > 2.0 * compute(0),
        "{} vs {}",
        compute(1),
        compute(0)
    );
}

#[test]
fn a_hung_rank_times_out_and_the_job_restarts() {
    let _serial = serial();
    let tmp = TempDir::new("dist-hang");
    let run = tmp.path().join("run");
    let mut args = tiny_args(&run, "6");
    args.extend(
        [
            "--checkpoint-every",
            "2",
            "--fault-hang-at",
            "3:1",
            "--collective-timeout",
            "2",
        ]
        .map(String::from),
    );
    let stderr = launch(2, &args);
    assert!(stderr.contains("rank 0: step 3: waited"), "{stderr}");
    assert!(stderr.contains("a peer rank is hung or dead"), "{stderr}");
    assert_eq!(metrics(&run).len(), 6);
}

/// The newest checkpoint folder of a run.
fn last_checkpoint(run: &Path) -> std::path::PathBuf {
    let mut steps: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .collect();
    steps.sort();
    steps.pop().unwrap()
}

/// The newest checkpoint's weights of a run, whole: read from `model.safetensors`, or put
/// together here from a sharded checkpoint's files by the parts `trainer.json` lists (each
/// value written exactly once).
fn last_weights(run: &Path) -> BTreeMap<String, nuwa_model::weights::HostTensor> {
    let dir = last_checkpoint(run);
    let read = |file: &str| {
        nuwa_model::weights::from_safetensors(&std::fs::read(dir.join(file)).unwrap(), file)
            .unwrap()
    };
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trainer.json")).unwrap()).unwrap();
    let Some(shards) = state["shards"].as_array() else {
        return read("model.safetensors");
    };
    assert!(!dir.join("model.safetensors").exists());
    let mut whole = BTreeMap::new();
    let mut written: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for shard in shards {
        for (name, t) in read(shard["model"].as_str().unwrap()) {
            let part = &shard["parts"][&name];
            // Where each value goes: one run from `offset`, or `count` runs `stride` apart.
            let (shape, offset, [stride, count]) = match part.as_object() {
                None => (t.shape.clone(), 0, [0, 1]),
                Some(p) => (
                    serde_json::from_value::<Vec<usize>>(p["shape"].clone()).unwrap(),
                    p["offset"].as_u64().unwrap() as usize,
                    serde_json::from_value::<Option<[usize; 2]>>(
                        p.get("runs").cloned().unwrap_or_default(),
                    )
                    .unwrap()
                    .unwrap_or([0, 1]),
                ),
            };
            let run = t.data.len() / count;
            let len = shape.iter().product::<usize>();
            let entry =
                whole
                    .entry(name.clone())
                    .or_insert_with(|| nuwa_model::weights::HostTensor {
                        shape,
                        data: vec![0.0; len],
                    });
            let counts = written.entry(name).or_insert_with(|| vec![0; len]);
            for (i, x) in t.data.iter().enumerate() {
                let at = offset + i / run * stride + i % run;
                entry.data[at] = *x;
                counts[at] += 1;
            }
        }
    }
    for (name, counts) in &written {
        assert!(counts.iter().all(|&c| c == 1), "{name}: not written once");
    }
    whole
}

/// The ranks that wrote the newest checkpoint's shards (empty: written whole).
fn shard_writers(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(last_checkpoint(run).join("trainer.json")).unwrap();
    let state: Value = serde_json::from_str(&text).unwrap();
    state["shards"]
        .as_array()
        .map(|s| s.iter().map(|r| r["rank"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

/// The largest difference between two runs' final weights (same names and shapes).
fn weights_differ_by(a: &Path, b: &Path) -> f32 {
    let (a, b) = (last_weights(a), last_weights(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(name, t)| {
            assert_eq!(t.shape, b[name].shape, "{name}");
            t.data
                .iter()
                .zip(&b[name].data)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        })
        .fold(0.0, f32::max)
}

/// [`sized_args`] for the tiny MoE preset.
fn moe_sized_args(run: &Path, steps: &str, batch: &str, hidden: &str) -> Vec<String> {
    let mut args = sized_args(run, steps, batch, hidden);
    args[1] = "tiny-moe".into();
    args
}

fn moe_args(run: &Path, steps: &str) -> Vec<String> {
    let mut args = moe_sized_args(run, steps, "8", "64");
    let at = args.iter().position(|a| a == "--seq-len").unwrap();
    args[at + 1] = "32".into();
    args
}

#[test]
fn expert_parallel_layouts_train_as_one_process() {
    let _serial = serial();
    let tmp = TempDir::new("dist-ep");
    let single = tmp.path().join("single");
    // Five steps: later, float rounding (sums over ranks in another order) can flip a
    // near-tied routing choice, a real but chaotic divergence.
    let reference = one_process(&moe_args(&single, "5"), &single);
    // (ranks, ranks per expert group, throttles): EP 2, EP 4, and DP 2 × EP 2, one member
    // slow (under DP 2 × EP 2 both its replicas: a member's speed is its replicas' mean) so
    // the measured placement gives it less expert work and fewer rows.
    for (np, ep, throttle) in [(2, 2, "1,4"), (4, 4, "1,1,4,1"), (4, 2, "1,4,1,4")] {
        let run = tmp.path().join(format!("np{np}-ep{ep}"));
        let mut args = moe_args(&run, "5");
        let ep_flag = ep.to_string();
        args.extend(
            [
                "--ep",
                &ep_flag,
                "--rebalance-every",
                "2",
                "--throttle",
                throttle,
            ]
            .map(String::from),
        );
        mpirun(np, &args);
        let got = metrics(&run);
        assert_eq!(got.len(), reference.len());
        for (step, rec) in &got {
            for key in ["loss", "load_balance_loss", "z_loss"] {
                assert_close(
                    rec,
                    &reference[step],
                    key,
                    format!("np {np} ep {ep} step {step}"),
                );
            }
            let placement = rec["expert_placement"].as_array().unwrap();
            assert_eq!(placement.len(), ep, "np {np} ep {ep}");
            let experts: u64 = placement.iter().map(|c| c.as_u64().unwrap()).sum();
            assert_eq!(experts, 8, "every expert placed once");
        }
        // The throttled rank was given less expert work: fewer experts, or experts that
        // carried fewer tokens (the placement follows measured loads, which move from step
        // to step this early in training).
        let last = got.values().last().unwrap();
        let counts: Vec<usize> = last["expert_placement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as usize)
            .collect();
        let slow = throttle.split(',').position(|t| t == "4").unwrap() % ep;
        let mine = counts[..slow].iter().sum::<usize>()..counts[..=slow].iter().sum::<usize>();
        let (mut held, mut all) = (0, 0);
        for layer in last["tokens_per_expert"].as_array().unwrap() {
            for (e, n) in layer.as_array().unwrap().iter().enumerate() {
                let n = n.as_u64().unwrap();
                all += n;
                held += if mine.contains(&e) { n } else { 0 };
            }
        }
        assert!(
            counts[slow] < counts.iter().max().copied().unwrap_or(0)
                || (held as f64) < all as f64 / ep as f64,
            "np {np} ep {ep}: the throttled rank should have less expert work: {held} of \
             {all} tokens with placement {counts:?}"
        );
        // Each rank of the first expert group wrote its experts (rank 0 the rest too);
        // together: the whole model, as one process trained it.
        assert_eq!(
            shard_writers(&run),
            (0..ep as u64).collect::<Vec<_>>(),
            "np {np} ep {ep}"
        );
        let diff = weights_differ_by(&run, &single);
        assert!(diff < 1e-5, "np {np} ep {ep}: weights differ by {diff}");
    }
}

#[test]
fn experts_split_by_width_train_as_one_process_and_resume_whole() {
    let _serial = serial();
    let tmp = TempDir::new("dist-ep-width");
    let single = tmp.path().join("single");
    let reference = one_process(&moe_args(&single, "6"), &single);
    // EP 2 and DP 2 × EP 2, one member throttled 4×: its share of every expert's columns
    // shrinks once measured (a re-placement that moves columns between ranks mid-run).
    for (np, throttle) in [(2, "1,4"), (4, "1,4,1,4")] {
        let run = tmp.path().join(format!("np{np}"));
        let mut args = moe_args(&run, "5");
        args.extend(
            [
                "--ep",
                "2",
                "--ep-split",
                "width",
                "--rebalance-every",
                "2",
                "--throttle",
                throttle,
            ]
            .map(String::from),
        );
        mpirun(np, &args);
        let got = metrics(&run);
        assert_eq!(got.len(), 5);
        for (step, rec) in &got {
            for key in ["loss", "load_balance_loss", "z_loss"] {
                assert_close(rec, &reference[step], key, format!("np {np} step {step}"));
            }
            assert_eq!(
                rec["expert_placement"],
                serde_json::json!([8, 8]),
                "every expert on both"
            );
        }
        let columns: Vec<u64> = serde_json::from_value(got[&5]["expert_columns"].clone()).unwrap();
        assert_eq!(
            columns.iter().sum::<u64>(),
            64,
            "tiny-moe at hidden 64: 64 columns"
        );
        assert!(
            columns[1] < columns[0],
            "the throttled member holds fewer columns: {columns:?}"
        );
        assert_eq!(shard_writers(&run), [0, 1], "np {np}");
        // Resumed in one process, the sharded checkpoint is put back together whole.
        resumes_whole(moe_args(&run, "6"), &run, &reference, &single, np);
    }
}

/// The sharded checkpoint of `run` resumed in one process (`args` for step 6): its step 6 is
/// the one-process `reference`'s, and the weights it ends with are `single`'s.
fn resumes_whole(
    mut args: Vec<String>,
    run: &Path,
    reference: &BTreeMap<u64, Value>,
    single: &Path,
    np: usize,
) {
    let at = args.iter().position(|a| a == "--run-dir").unwrap();
    args[at] = "--resume".into();
    let resumed = one_process(&args, run);
    assert_close(
        &resumed[&6],
        &reference[&6],
        "loss",
        format!("np {np} resumed"),
    );
    let diff = weights_differ_by(run, single);
    assert!(diff < 1e-5, "np {np}: weights differ by {diff}");
}

#[test]
fn experts_with_shared_boundaries_train_as_one_process_and_resume_whole() {
    let _serial = serial();
    let tmp = TempDir::new("dist-ep-shared");
    let single = tmp.path().join("single");
    // At hidden 128 a step's compute is long enough for the throttle to be measured
    // reliably at the first re-placement (at 64, a few milliseconds, it may be noise).
    let args_for = |run: &Path, steps: &str| {
        let mut args = moe_args(run, steps);
        let at = args.iter().position(|a| a == "--hidden-size").unwrap();
        args[at + 1] = "128".into();
        args
    };
    let reference = one_process(&args_for(&single, "6"), &single);
    // EP 2 and DP 2 × EP 2, one member throttled 4×: neighbouring members share two experts
    // whose rows they split afresh in every micro-batch by the members' speeds; once
    // measured, the slow member holds fewer experts and runs fewer rows.
    for (np, throttle) in [(2, "1,4"), (4, "1,4,1,4")] {
        let run = tmp.path().join(format!("np{np}"));
        let mut args = args_for(&run, "5");
        args.extend(
            [
                "--ep",
                "2",
                "--ep-split",
                "shared",
                "--rebalance-every",
                "2",
                "--throttle",
                throttle,
            ]
            .map(String::from),
        );
        mpirun(np, &args);
        let got = metrics(&run);
        assert_eq!(got.len(), 5);
        // Each (token, expert) row runs once in its group: 8 sequences of 32 tokens, top-2
        // (per replica group under DP 2 × EP 2, half of them).
        let first: Vec<f64> = got[&1]["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["expert_rows"].as_f64().unwrap())
            .collect();
        let group_rows = 8.0 * 32.0 * 2.0 / (np / 2) as f64;
        assert_eq!(
            first[0] + first[1],
            group_rows,
            "np {np}: expert rows at step 1"
        );
        for (step, rec) in &got {
            for key in ["loss", "load_balance_loss", "z_loss"] {
                assert_close(rec, &reference[step], key, format!("np {np} step {step}"));
            }
            let placement: Vec<u64> =
                serde_json::from_value(rec["expert_placement"].clone()).unwrap();
            assert_eq!(rec["expert_shared"], serde_json::json!([2]), "np {np}");
            assert_eq!(
                placement.iter().sum::<u64>(),
                8 + 2,
                "8 experts, 2 held twice"
            );
        }
        let last = &got[&5];
        let placement: Vec<u64> = serde_json::from_value(last["expert_placement"].clone()).unwrap();
        assert!(placement[1] < placement[0], "np {np}: {placement:?}");
        // The slow member ran fewer expert rows (each row runs once in its group).
        let rows: Vec<f64> = last["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["expert_rows"].as_f64().unwrap())
            .collect();
        assert!(rows[1] < rows[0], "np {np}: expert rows per rank {rows:?}");
        assert_eq!(shard_writers(&run), [0, 1], "np {np}");
        // The routers' loads are uneven from the first steps: the layer takes an order of its
        // own, its busiest experts in the shared window (the steps after train as one process
        // did). Whether it still has one at the last step depends on the placement measured.
        let own_orders = got
            .values()
            .map(|r| r["expert_own_orders"].as_u64().unwrap());
        assert!(
            own_orders.max() > Some(0),
            "np {np}: the layer never took an order of its own"
        );
        // Resumed in one process, the shards (each shared expert written once, every layer
        // in expert order) make the whole model again.
        resumes_whole(args_for(&run, "6"), &run, &reference, &single, np);
    }
}

#[test]
fn a_step_split_finer_than_its_micro_batches_trains_as_one_process() {
    let _serial = serial();
    let tmp = TempDir::new("dist-micro");
    // 4 micro-batches of 5: a step's 20 rows split between two ranks by any share that is
    // not a multiple of 4 (the equal 10 : 10 of the first steps among them) cannot be split
    // alike in each micro-batch, so the ranks' rows differ from one micro-batch to the next.
    // Which shares the balancer picks later depends on timing; the first steps' does not.
    let args = |run: &Path| {
        let mut args = moe_sized_args(run, "5", "5", "64");
        let at = args.iter().position(|a| a == "--seq-len").unwrap();
        args[at + 1] = "32".into();
        args.extend(["--grad-accum", "4"].map(String::from));
        args
    };
    let single = tmp.path().join("single");
    let reference = one_process(&args(&single), &single);
    // One rank throttled, so the later steps re-balance to unequal shares too.
    for (ep, throttle) in [("1", "1,2"), ("2", "1,1.5")] {
        let run = tmp.path().join(format!("ep{ep}"));
        let mut a = args(&run);
        a.extend(["--ep", ep, "--rebalance-every", "1", "--throttle", throttle].map(String::from));
        mpirun(2, &a);
        let got = metrics(&run);
        assert_eq!(got.len(), reference.len());
        let mut finer = false;
        for (step, rec) in &got {
            for key in ["loss", "load_balance_loss", "z_loss"] {
                assert_close(rec, &reference[step], key, format!("ep {ep} step {step}"));
            }
            let seqs: Vec<u64> = rec["ranks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["seqs"].as_f64().unwrap() as u64)
                .collect();
            assert_eq!(seqs.iter().sum::<u64>(), 20, "ep {ep} step {step}");
            finer |= !seqs[0].is_multiple_of(4);
        }
        assert!(
            finer,
            "ep {ep}: no split finer than the micro-batches: {got:?}"
        );
        let diff = weights_differ_by(&run, &single);
        assert!(diff < 1e-5, "ep {ep}: weights differ by {diff}");
    }
}

#[test]
fn an_expert_that_gets_no_tokens_moves_as_in_one_process() {
    let _serial = serial();
    let tmp = TempDir::new("dist-ep-starved");
    // EP 8 on 8 ranks, one expert each, 32 tokens a step: some expert gets none in some step.
    // Its rank has no gradient for it; one process has zeros there, and AdamW still moves it
    // by its moments.
    let args = |run: &Path| {
        let mut args = moe_args(run, "5");
        let at = args.iter().position(|a| a == "--seq-len").unwrap();
        args[at + 1] = "4".into();
        args
    };
    let single = tmp.path().join("single");
    let reference = one_process(&args(&single), &single);
    let run = tmp.path().join("ep8");
    let mut ep = args(&run);
    ep.extend(["--ep", "8"].map(String::from));
    mpirun(8, &ep);
    let got = metrics(&run);
    let mut starved = 0;
    for (step, rec) in &got {
        // The logged load is the global batch's, as one process counts it.
        assert_eq!(
            rec["tokens_per_expert"], reference[step]["tokens_per_expert"],
            "step {step}"
        );
        starved += rec["tokens_per_expert"][0]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.as_u64() == Some(0))
            .count();
        assert_close(rec, &reference[step], "loss", format!("step {step}"));
    }
    assert!(starved > 0, "no expert went without tokens: {got:?}");
    let diff = weights_differ_by(&run, &single);
    assert!(diff < 1e-5, "weights differ by {diff}");
}

#[test]
fn a_killed_expert_parallel_rank_restarts_on_fewer_ranks_resharded() {
    let _serial = serial();
    let tmp = TempDir::new("dist-ep-kill");
    let run = tmp.path().join("run");
    let mut args = moe_args(&run, "8");
    args.extend(
        [
            "--ep",
            "2",
            "--checkpoint-every",
            "2",
            "--fault-kill-at",
            "5:1",
        ]
        .map(String::from),
    );
    // DP 2 × EP 2; rank 1 dies in step 5; the job goes on from step 4 on 3 ranks, one expert
    // group of 3 (the checkpoint holds every expert whole, so it loads on any layout).
    let stderr = launch(4, &args);
    assert!(
        stderr.contains("restarting from checkpoint step 4 on 3 rank(s)"),
        "{stderr}"
    );
    let steps = metrics(&run);
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let mut ids: Vec<u64> = steps
        .values()
        .flat_map(|r| {
            let start = r["sample_start"].as_u64().unwrap();
            start..start + r["sample_count"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..64).collect::<Vec<_>>(), "every sample once");
    assert_eq!(steps[&4]["expert_placement"].as_array().unwrap().len(), 2);
    assert_eq!(steps[&5]["expert_placement"].as_array().unwrap().len(), 3);
    // The same run in one process, stopped and resumed nowhere: the losses agree.
    let single = tmp.path().join("single");
    let reference = one_process(&moe_args(&single, "8"), &single);
    // Through the restart (step 5 is the first on 3 ranks); later steps may part by a flipped
    // near-tie in routing, as any change of summation order can make them.
    for (step, rec) in steps.range(1..=5) {
        assert_close(rec, &reference[step], "loss", format!("step {step}"));
    }
}

#[test]
fn an_expert_layout_that_does_not_divide_is_one_clear_error() {
    let _serial = serial();
    let tmp = TempDir::new("dist-ep-bad");
    let run = tmp.path().join("run");
    let mut args = moe_args(&run, "2");
    args.extend(["--ep", "3"].map(String::from));
    let out = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-np",
            "2",
            NUWA,
            "train",
            "--dist",
            "mpi",
        ])
        .args(&args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ep 3: the 2 rank(s) do not divide into expert-parallel groups of 3"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Ranks started with different arguments (mpirun's `A : B`) stop at once with one line
/// naming the setting: a different layout waited forever on collectives the other rank
/// never called, and a different weight decay trained the replicas apart, silently.
#[test]
fn ranks_started_with_different_settings_stop_with_one_line() {
    let _serial = serial();
    let tmp = TempDir::new("dist-mismatch");
    let cases = [
        (vec!["--ep", "2"], "--ep is 2 on rank 0 but 1 on rank 1"),
        (
            vec!["--weight-decay", "0.5"],
            "train.weight_decay is 0.5 on rank 0 but",
        ),
    ];
    for (i, (first_only, said)) in cases.iter().enumerate() {
        let run = tmp.path().join(format!("run-{i}"));
        let args = moe_args(&run, "3");
        let rank = |extra: &[&str]| {
            let mut a = vec!["-np".to_string(), "1".into(), NUWA.into(), "train".into()];
            a.extend(["--dist", "mpi", "--collective-timeout", "120"].map(String::from));
            a.extend(args.iter().cloned());
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let started = std::time::Instant::now();
        let out = Command::new("mpirun")
            .arg("--oversubscribe")
            .args(rank(first_only))
            .arg(":")
            .args(rank(&[]))
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(said), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
        assert!(!run.join("checkpoints").exists());
    }
}

/// `nuwa train --dist mpi ARGS` on `np` ranks, which must fail; returns its stderr.
fn mpirun_failing(np: usize, args: &[String]) -> String {
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "-np", &np.to_string(), NUWA])
        .args(["train", "--dist", "mpi"])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// `4.000 kB`, `1.269 MB`, `2.5 GB` as bytes.
fn bytes_of(text: &str) -> f64 {
    let (value, unit) = text.trim().split_once(' ').unwrap();
    let scale = match unit {
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => panic!("unit {other}"),
    };
    value.parse::<f64>().unwrap() * scale
}

#[test]
fn a_rank_gets_no_more_experts_than_its_memory_holds() {
    let _serial = serial();
    let tmp = TempDir::new("dist-ep-memory");
    let cluster = |rank1_gb: f64| {
        let path = tmp.path().join(format!("cluster-{rank1_gb}.toml"));
        let text = format!(
            "[[rank]]\ndevice = \"cpu\"\n[[rank]]\ndevice = \"cpu\"\nmemory_gb = {rank1_gb}\n"
        );
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let args = |run: &Path, cluster: &str, split: &str| {
        let mut a = moe_args(run, "4");
        let split = ["--ep", "2", "--ep-split", split, "--cluster", cluster];
        a.extend(split.map(String::from));
        a
    };
    // Too little memory for the dense parameters and one expert: one line saying what
    // each takes (f32 weights, gradients and AdamW moments in 80% of the memory).
    let run = tmp.path().join("none");
    let stderr = mpirun_failing(2, &args(&run, &cluster(1e-6), "experts"));
    let line = stderr
        .lines()
        .find(|l| l.contains("rank 1's memory (1.000 kB) does not hold the dense parameters"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let (_, sizes) = line.split_once("they take ").unwrap();
    let (dense, expert) = sizes.split_once(" and ").unwrap();
    let dense = bytes_of(dense);
    let expert = bytes_of(expert.trim_end_matches(" with gradients and optimiser state"));
    // Room for 2.5 experts beside the dense part: rank 1 holds 2 of the 8 (the placement is
    // otherwise equal: 4 : 4), from the first step on and after the re-placements.
    let roomy = cluster((dense + 2.5 * expert) / 0.8 / 1e9);
    let single = tmp.path().join("single");
    let reference = one_process(&moe_args(&single, "4"), &single);
    let run = tmp.path().join("capped");
    mpirun(2, &args(&run, &roomy, "experts"));
    for (step, rec) in &metrics(&run) {
        assert_eq!(
            rec["expert_placement"],
            serde_json::json!([6, 2]),
            "step {step}"
        );
        assert_close(rec, &reference[step], "loss", format!("step {step}"));
    }
    // Split by width: at most the columns of every expert that room holds (2.5 experts'
    // worth of 64 columns of 8 experts: 20).
    let run = tmp.path().join("capped-width");
    mpirun(2, &args(&run, &roomy, "width"));
    for (step, rec) in &metrics(&run) {
        let columns: Vec<u64> = serde_json::from_value(rec["expert_columns"].clone()).unwrap();
        assert_eq!(columns, [44, 20], "step {step}");
        assert_close(
            rec,
            &reference[step],
            "loss",
            format!("by width, step {step}"),
        );
    }
    // Both ranks that small: the group cannot hold the 8 experts.
    let small = tmp.path().join("small.toml");
    let each = (dense + 3.5 * expert) / 0.8 / 1e9;
    std::fs::write(
        &small,
        format!("[[rank]]\ndevice = \"cpu\"\nmemory_gb = {each}\n"),
    )
    .unwrap();
    let run = tmp.path().join("small");
    let stderr = mpirun_failing(2, &args(&run, &small.display().to_string(), "experts"));
    assert!(
        stderr.contains("--ep 2: the group's memories hold 6 of the model's 8 experts"),
        "{stderr}"
    );
    // The same memories under pipeline parallelism: each stage's group holds only its own
    // layers' experts (the MoE layer's stage: one layer, without the embeddings), so the
    // 8 experts fit, and the job trains as one process.
    let run = tmp.path().join("small-pp");
    let mut pp = args(&run, &small.display().to_string(), "experts");
    pp.extend(["--pp", "2"].map(String::from));
    mpirun(4, &pp);
    for (step, rec) in &metrics(&run) {
        assert_close(rec, &reference[step], "loss", format!("pp 2, step {step}"));
    }
    // Ranks 1-3 with a memory that holds no decoder layer: one line naming the first stage's
    // (ranks 0 and 2) smallest, before a stage runs out of memory (the stages used to be
    // given a layer each whatever their memory).
    let run = tmp.path().join("no-layer-pp");
    let mut pp = args(&run, &cluster(1e-6), "experts");
    pp.extend(["--pp", "2"].map(String::from));
    let stderr = mpirun_failing(4, &pp);
    assert!(
        stderr.lines().any(|l| l.starts_with(
            "error: --pp 2: rank 2's memory (1.000 kB) does not hold one decoder layer"
        )),
        "{stderr}"
    );
}

/// A 4-layer model trained on 4 micro-batches (`--grad-accum`) of 4 sequences per step.
fn pipeline_args(run: &Path, preset: &str) -> Vec<String> {
    let mut args = sized_args(run, "5", "4", "64");
    args[1] = preset.into();
    let layers = args.iter().position(|a| a == "--layers").unwrap();
    args[layers + 1] = "4".into();
    let seq = args.iter().position(|a| a == "--seq-len").unwrap();
    args[seq + 1] = "32".into();
    let eval = args.iter().position(|a| a == "--eval-every").unwrap();
    args[eval + 1] = "5".into();
    args.extend(["--grad-accum", "4"].map(String::from));
    args
}

#[test]
fn pipeline_layouts_train_as_one_process() {
    let _serial = serial();
    let tmp = TempDir::new("dist-pp");
    for preset in ["tiny-dense", "tiny-moe"] {
        let single = tmp.path().join(format!("{preset}-single"));
        let reference = one_process(&pipeline_args(&single, preset), &single);
        // PP 2 with the first stage's rank 3x slower (it should get fewer layers), DP 2 × PP 2,
        // and for the MoE model DP 2 × EP 2 × PP 2: every axis at once.
        let mut layouts = vec![
            (2, "--pp=2", "--ep=1", "3,1"),
            (4, "--pp=2", "--ep=1", "1,1,1,1"),
        ];
        if preset == "tiny-moe" {
            layouts.push((4, "--pp=2", "--ep=2", "1,1,1,1"));
            layouts.push((4, "--pp=2", "--ep=2 --ep-split=width", "1,1,1,1"));
            layouts.push((4, "--pp=2", "--ep=2 --ep-split=shared", "1,1,1,1"));
        }
        for (np, pp, ep, throttle) in layouts {
            let run = tmp
                .path()
                .join(format!("{preset}-{np}{pp}{}", ep.replace(' ', "")));
            let mut args = pipeline_args(&run, preset);
            args.push(pp.into());
            args.extend(ep.split(' ').map(String::from));
            args.extend(["--throttle", throttle].map(String::from));
            mpirun(np, &args);
            let got = metrics(&run);
            assert_eq!(got.len(), reference.len());
            let what = format!("{preset} np {np} {pp} {ep}");
            for (step, rec) in &got {
                let mut keys = vec!["loss"];
                if preset == "tiny-moe" {
                    keys.extend(["load_balance_loss", "z_loss"]);
                }
                for key in keys {
                    assert_close(rec, &reference[step], key, format!("{what} step {step}"));
                }
                assert_eq!(rec["ranks"].as_array().unwrap().len(), np);
            }
            assert_close(&got[&5], &reference[&5], "val_loss", what.clone());
            let stages: Vec<u64> = got[&1]["stage_layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(stages.iter().sum::<u64>(), 4, "{what}: {stages:?}");
            if throttle == "3,1" {
                assert!(
                    stages[0] < stages[1],
                    "{what}: the slow first stage should hold fewer layers: {stages:?}"
                );
            }
            // Replica 0 of every stage wrote its stage (with expert groups: the first group's
            // ranks their experts); ranks are replica-major, rank = replica · pp + stage.
            let writers = if ep.starts_with("--ep=2") {
                vec![0, 1, 2, 3]
            } else {
                vec![0, 1]
            };
            assert_eq!(shard_writers(&run), writers, "{what}");
            let diff = weights_differ_by(&run, &single);
            assert!(diff < 1e-5, "{what}: weights differ by {diff}");
        }
    }
}

#[test]
fn a_pipeline_rank_that_slows_down_is_named_a_straggler() {
    let _serial = serial();
    let tmp = TempDir::new("dist-pp-straggler");
    let run = tmp.path().join("run");
    let mut args = pipeline_args(&run, "tiny-dense");
    // Steps long enough (tens of ms) that timing noise is not a 1.5x slowdown.
    for (flag, value) in [
        ("--steps", "9"),
        ("--hidden-size", "128"),
        ("--batch-size", "8"),
    ] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = value.into();
    }
    // Stage 1's rank becomes 4x slower at step 4.
    args.extend(["--pp", "2", "--throttle", "1,4", "--throttle-from", "4"].map(String::from));
    mpirun(2, &args);
    let steps = metrics(&run);
    let flagged: Vec<u64> = steps
        .iter()
        .filter(|(_, r)| r["stragglers"].as_array().unwrap().iter().any(|s| s == 1))
        .map(|(s, _)| *s)
        .collect();
    // Three slow steps in a row name it (from step 6), and it stays named while slow; the
    // other rank, which only waits for it, never is.
    assert!(
        [6, 7, 8, 9].iter().all(|s| flagged.contains(s)),
        "flagged at {flagged:?}"
    );
    assert!(steps
        .values()
        .all(|r| !r["stragglers"].as_array().unwrap().iter().any(|s| s == 0)));
}

#[test]
fn a_pipeline_checkpoint_resumes_on_another_layout() {
    let _serial = serial();
    let tmp = TempDir::new("dist-pp-resume");
    let single = tmp.path().join("single");
    let reference = one_process(&pipeline_args(&single, "tiny-moe"), &single);
    // Steps 1-3 as DP 2 × PP 2, then 4-5 resumed as EP 2 (no pipeline) on 2 ranks.
    let run = tmp.path().join("run");
    let mut first = pipeline_args(&run, "tiny-moe");
    first.extend(["--pp", "2", "--stop-at", "3"].map(String::from));
    mpirun(4, &first);
    // Each stage's first replica wrote its part. A damaged part is one clear line naming it.
    assert_eq!(shard_writers(&run), vec![0, 1]);
    let broken = tmp.path().join("broken");
    let copied = Command::new("cp").arg("-r").args([&run, &broken]).status();
    assert!(copied.unwrap().success());
    let shard = last_checkpoint(&broken).join("model-rank-00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(NUWA)
        .args(["export", &broken.display().to_string(), "--out"])
        .arg(tmp.path().join("export"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("model-rank-00001.safetensors: checksum mismatch")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    let mut again: Vec<String> = pipeline_args(&run, "tiny-moe")
        .into_iter()
        .filter(|a| a != "--run-dir" && a != &run.display().to_string())
        .collect();
    again.extend([
        "--ep".to_string(),
        "2".into(),
        "--resume".into(),
        run.display().to_string(),
    ]);
    mpirun(2, &again);
    let got = metrics(&run);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    for (step, rec) in &got {
        assert_close(rec, &reference[step], "loss", format!("step {step}"));
    }
    assert!(got[&3]["stage_layers"].is_array() && got[&4]["expert_placement"].is_array());
    // Steps 1-3 as PP 2 × EP 2 (each stage's two ranks an expert group), then 4-5 resumed as
    // PP 2 alone on 2 ranks: every rank writes its stage's experts (and no other stage's:
    // their shards claimed each other's experts, and the resume failed), read back whole.
    let run = tmp.path().join("run-pp-ep");
    let mut first = pipeline_args(&run, "tiny-moe");
    first.extend(["--pp", "2", "--ep", "2", "--stop-at", "3"].map(String::from));
    mpirun(4, &first);
    assert_eq!(shard_writers(&run), vec![0, 1, 2, 3]);
    // Merging a sharded checkpoint gives whole files (the merged state named the source's
    // shards, and nothing could read it): merged alone, it is what `export` writes.
    let nuwa_ok = |args: &[&str]| {
        let out = Command::new(NUWA).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nuwa {args:?}: {stderr}");
    };
    let (exported, merged) = (tmp.path().join("exported"), tmp.path().join("merged"));
    let path = |p: &Path| p.display().to_string();
    nuwa_ok(&["export", &path(&run), "--out", &path(&exported)]);
    nuwa_ok(&[
        "merge",
        &path(&run),
        "--last",
        "1",
        "--hf",
        "--out",
        &path(&merged),
    ]);
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(weights(&exported) == weights(&merged));
    let merged_run = tmp.path().join("merged-run");
    nuwa_ok(&[
        "merge",
        &path(&run),
        "--last",
        "1",
        "--out",
        &path(&merged_run),
    ]);
    nuwa_ok(&["sample", "--run", &path(&merged_run), "--max-tokens", "4"]);
    let mut again: Vec<String> = pipeline_args(&run, "tiny-moe")
        .into_iter()
        .filter(|a| a != "--run-dir" && a != &run.display().to_string())
        .collect();
    again.extend(["--pp", "2", "--resume"].map(String::from));
    again.push(run.display().to_string());
    mpirun(2, &again);
    let got = metrics(&run);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    for (step, rec) in &got {
        assert_close(
            rec,
            &reference[step],
            "loss",
            format!("PP × EP, step {step}"),
        );
    }
}

/// A plan file for `nuwa launch --plan`: tiny-moe on `ranks` of `device`.
fn write_plan(dir: &Path, layout: &str, device: &str, ranks: usize) -> std::path::PathBuf {
    let path = dir.join("plan.toml");
    let text = format!(
        "model = \"tiny-moe\"\nseq_len = 32\nglobal_batch = 16\n[layout]\n{layout}\n\
         [[part]]\ndevice = \"{device}\"\ncount = {ranks}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_plan_file_runs_as_planned() {
    let _serial = serial();
    let tmp = TempDir::new("dist-plan");
    // DP 2 × EP 2 × PP 2: micro-batches of 2 sequences per replica (4 per step's micro-batch),
    // 4 of them to the global batch of 16; the stages fixed 2 : 2, where measured ones are
    // 3 : 1 (the last stage has the LM head).
    let plan = write_plan(
        tmp.path(),
        "pp = 2\nep = 2\ndp = 2\nmicro_batch = 2\nstage_layers = [2, 2]",
        "local-cpu",
        4,
    );
    let run = tmp.path().join("run");
    let common = [
        "--steps",
        "3",
        "--lr",
        "3e-3",
        "--quiet",
        "--sample-tokens",
        "0",
        "--eval-every",
        "1000",
    ];
    let launch_plan = |plan: &Path, run: &Path| {
        let out = Command::new(NUWA)
            .args(["launch", "--plan", plan.to_str().unwrap()])
            .args(["--mpirun-arg=-x", "--mpirun-arg=RAYON_NUM_THREADS", "--"])
            .args(common)
            .args(["--run-dir", run.to_str().unwrap()])
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        metrics(run)
    };
    let got = launch_plan(&plan, &run);
    let single = tmp.path().join("single");
    let mut args: Vec<String> = common.map(String::from).to_vec();
    args.extend(
        [
            "--preset",
            "tiny-moe",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--grad-accum",
            "4",
            "--run-dir",
        ]
        .map(String::from),
    );
    args.push(single.display().to_string());
    let reference = one_process(&args, &single);
    for (step, rec) in &got {
        assert_close(rec, &reference[step], "loss", format!("step {step}"));
        assert_eq!(rec["ranks"].as_array().unwrap().len(), 4);
        assert_eq!(
            rec["stage_layers"],
            serde_json::json!([2, 2]),
            "step {step}"
        );
        assert_eq!(rec["expert_placement"].as_array().unwrap().len(), 2);
        for r in rec["ranks"].as_array().unwrap() {
            assert_eq!(r["device"], "local-cpu", "each rank on the plan's device");
            // What `plan verify` compares with the memory model: the peak less what the
            // process held before it built its part of the model.
            let (peak, before) = (
                r["peak_rss_bytes"].as_f64().unwrap(),
                r["rss_before_model_bytes"].as_f64().unwrap(),
            );
            assert!(before > 0.0 && before < peak, "step {step}: {r}");
        }
    }
    // DP 2 × EP 2 with the experts split by width, as the plan says (no --ep-split flag).
    let plan = write_plan(
        tmp.path(),
        "ep = 2\ndp = 2\nmicro_batch = 2\nexpert_split = \"width\"",
        "local-cpu",
        2,
    );
    for (step, rec) in &launch_plan(&plan, &tmp.path().join("run-width")) {
        assert_close(
            rec,
            &reference[step],
            "loss",
            format!("by width, step {step}"),
        );
        let columns: Vec<u64> = serde_json::from_value(rec["expert_columns"].clone()).unwrap();
        assert_eq!(columns.len(), 2, "step {step}: {rec}");
        assert_eq!(
            columns.iter().sum::<u64>(),
            128,
            "tiny-moe: experts 128 wide"
        );
    }
}

#[test]
fn a_plan_that_cannot_run_is_one_line_before_any_rank_starts() {
    let tmp = TempDir::new("dist-plan-bad");
    let cases = [
        // (layout, device, ranks, extra launch flags, extra train flags, what the line says)
        (
            "pp = 5\ndp = 1",
            "local-cpu",
            5,
            vec![],
            vec![],
            "layout.pp = 5: the model has only 4 decoder layers",
        ),
        (
            "ep = 16\ndp = 16",
            "local-cpu",
            16,
            vec![],
            vec![],
            "layout.ep = 16: more ranks per expert group than the model's 8 routed experts",
        ),
        (
            "pp = 2\ndp = 2",
            "local-cpu",
            4,
            vec!["--np", "6"],
            vec![],
            "--np 6",
        ),
        (
            "pp = 2\ndp = 2",
            "H800-SXM",
            4,
            vec![],
            vec![],
            "trains on the cuda backend, which this nuwa was built without",
        ),
        (
            "pp = 2\ndp = 2",
            "Ascend-910B",
            4,
            vec![],
            vec![],
            "no backend of nuwa drives it yet",
        ),
        (
            "pp = 2\ndp = 3",
            "local-cpu",
            4,
            vec![],
            vec![],
            "pp 2 × dp 3 = 6 ranks, but the parts list 4 devices",
        ),
        // Whole experts placed, run split by width; split by width, run with the flag
        // saying otherwise; and a plan that both splits by width and places whole experts.
        (
            "ep = 2\ndp = 2\nexpert_placement = [4, 4]",
            "local-cpu",
            2,
            vec![],
            vec!["--ep-split", "width"],
            "its layout.expert_placement counts whole experts per rank",
        ),
        (
            "ep = 2\ndp = 2\nexpert_split = \"width\"",
            "local-cpu",
            2,
            vec![],
            vec!["--ep-split", "experts"],
            "the plan says width; leave the flag out",
        ),
        (
            "ep = 2\ndp = 2\nexpert_split = \"width\"\nexpert_placement = [4, 4]",
            "local-cpu",
            2,
            vec![],
            vec![],
            "layout.expert_split = \"width\": every rank holds a share of every expert",
        ),
    ];
    for (layout, device, ranks, flags, train_flags, says) in cases {
        let plan = write_plan(tmp.path(), layout, device, ranks);
        let out = Command::new(NUWA)
            .args(["launch", "--plan", plan.to_str().unwrap()])
            .args(&flags)
            .args(["--", "--run-dir", tmp.path().join("run").to_str().unwrap()])
            .args(&train_flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{layout}: {stderr}");
        assert!(stderr.contains(says), "{layout} on {device}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("attempt"), "no rank may start: {stderr}");
        assert!(!tmp.path().join("run").exists());
    }
}

#[test]
fn memory_per_rank_falls_as_the_layout_predicts() {
    let _serial = serial();
    let tmp = TempDir::new("dist-memory");
    // A MoE model whose weights, gradients and AdamW moments dominate a rank's memory.
    let args = |run: &Path| -> Vec<String> {
        let mut a = moe_sized_args(run, "3", "4", "512");
        let layers = a.iter().position(|x| x == "--layers").unwrap();
        a[layers + 1] = "4".into();
        a
    };
    // Each rank's peak RSS and the part of it its model took: the peak less what the rank
    // held before it built its part (program, MPI, data, the pipeline's timing of a layer),
    // which the layout does not decide. The allocator keeps freed pages (src/main.rs), so
    // what a rank did before its model moves its whole peak by tens of MiB from one build
    // to the next; the model's part is what a layout predicts.
    let peaks = |run: &Path| -> Vec<(f64, f64)> {
        let last = metrics(run).into_values().last().unwrap();
        let ranks = last["ranks"].as_array().unwrap().clone();
        ranks
            .iter()
            .map(|r| {
                let peak = r["peak_rss_bytes"].as_f64().unwrap();
                (peak, peak - r["rss_before_model_bytes"].as_f64().unwrap())
            })
            .collect()
    };
    let dp = tmp.path().join("dp");
    mpirun(2, &args(&dp));
    let weights = last_weights(&dp);
    let size = |keep: &dyn Fn(&str) -> bool| -> f64 {
        weights
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(_, t)| t.data.len() as f64)
            .sum()
    };
    let total = size(&|_| true);
    let experts = size(&|n| n.contains(".moe.experts."));
    let dp_peaks = peaks(&dp);
    for (flag, held) in [
        ("--ep", vec![total - experts / 2.0; 2]),
        ("--pp", Vec::new()),
    ] {
        let run = tmp.path().join(flag.trim_start_matches('-'));
        let mut a = args(&run);
        a.extend([flag.to_string(), "2".into()]);
        mpirun(2, &a);
        // What each rank holds: half the experts, or its stage's layers (and the embeddings
        // on the first, the final norm and head on the last).
        let held = match held.is_empty() {
            false => held,
            true => {
                let rec = metrics(&run).into_values().last().unwrap();
                let stages: Vec<usize> = rec["stage_layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect();
                let layer_of = |n: &str| {
                    n.strip_prefix("layers.")?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                };
                let first = move |n: &str| match layer_of(n) {
                    Some(l) => l < stages[0],
                    None => n.starts_with("word_embeddings"),
                };
                vec![size(&first), total - size(&first)]
            }
        };
        for (r, (&(peak, model), &want)) in peaks(&run).iter().zip(&held).enumerate() {
            // Data parallelism's model part, scaled to what this rank holds.
            let (dp_peak, dp_model) = dp_peaks[r];
            let predicted = dp_model * want / total;
            let mib = |b: f64| b / 1048576.0;
            assert!(
                peak < 0.85 * dp_peak && model <= 1.15 * predicted,
                "{flag} 2, rank {r}: peak RSS {:.0} MiB, its model took {:.0} MiB; data \
                 parallelism's {:.0} MiB, its model {:.0} MiB: holding {:.2} of the parameters \
                 predicts {:.0} MiB",
                mib(peak),
                mib(model),
                mib(dp_peak),
                mib(dp_model),
                want / total,
                mib(predicted)
            );
        }
    }
}

/// Ranks on different backends in one job (the flex CPU backend beside NdArray, and beside
/// wgpu on Mesa's software Vulkan driver where the build has it): data, expert (by experts and
/// by width) and pipeline parallelism train as one process does. Rows, expert inputs and
/// gradients cross between backends through host memory. The backends' kernels sum in other
/// orders, so losses are compared at 1e-4 relative and weights at 1e-4 (`docs/PARITY.md`'s
/// tolerances for one backend against another), not 1e-5.
#[cfg(feature = "ndarray")]
#[test]
fn ranks_on_different_backends_train_as_one_process() {
    let _serial = serial();
    let tmp = TempDir::new("dist-backends");
    let args = |run: &Path| -> Vec<String> {
        let mut a = moe_args(run, "4");
        a.extend(["--grad-accum", "2"].map(String::from));
        a
    };
    let single = tmp.path().join("single");
    let reference = one_process(&args(&single), &single);
    let mut devices = vec!["ndarray"];
    if cfg!(feature = "wgpu") {
        devices.push("wgpu:0");
    }
    for other in devices {
        let cluster = tmp.path().join(format!("{}.toml", other.replace(':', "")));
        std::fs::write(
            &cluster,
            format!("[[rank]]\ndevice = \"cpu\"\n[[rank]]\ndevice = \"{other}\"\n"),
        )
        .unwrap();
        for layout in ["--ep=1", "--ep=2", "--ep=2 --ep-split=width", "--pp=2"] {
            let what = format!("cpu + {other}, {layout}");
            let run = tmp.path().join(format!(
                "{}{}",
                other.replace(':', ""),
                layout.replace([' ', '='], "")
            ));
            let mut a = args(&run);
            a.extend(layout.split(' ').map(String::from));
            a.extend(["--cluster".into(), cluster.display().to_string()]);
            mpirun(2, &a);
            let got = metrics(&run);
            assert_eq!(got.len(), reference.len(), "{what}");
            for (step, rec) in &got {
                for key in ["loss", "load_balance_loss"] {
                    let (a, b) = (
                        rec[key].as_f64().unwrap(),
                        reference[step][key].as_f64().unwrap(),
                    );
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                        "{what} step {step}: {key} {a} vs one process {b}"
                    );
                }
                let devices: Vec<&str> = rec["ranks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["device"].as_str().unwrap_or(""))
                    .collect();
                assert_eq!(devices, ["cpu", other], "{what}");
            }
            let diff = weights_differ_by(&run, &single);
            assert!(diff < 1e-4, "{what}: weights differ by {diff}");
        }
    }
}
