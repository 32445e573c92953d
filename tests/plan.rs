//! The cost planner through the binary: search under constraints, reasons for infeasibility,
//! bad inventories, Ant's worked example, and predicted vs measured step time on this machine.

mod common;

use common::{assert_clean_error, nuwa, TempDir};
use serde_json::Value;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// The timing test measures this machine's speed: nothing else in this binary may run beside
/// it (on a 2-core CI machine a concurrent test halves the calibration's measured speed).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn inventory(dir: &Path, body: &str) -> String {
    let path = dir.join("inv.toml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

const MIX: &str = "currency = \"CNY\"\n\
    [[device]]\nname = \"D\"\ncount = 2048\ndomestic = false\n\
    [[device]]\nname = \"A\"\ncount = 4096\ndomestic = true\n\
    [[device]]\nname = \"E\"\ncount = 1024\ndomestic = true\n";

#[test]
fn the_search_meets_every_constraint_and_ranks_by_cost() {
    let _alone = serial();
    let tmp = TempDir::new("plan-search");
    let inv = inventory(tmp.path(), MIX);
    let json = tmp.path().join("plans.json");
    let svg = tmp.path().join("frontier.svg");
    let out = nuwa(&[
        "plan",
        "--model",
        "ling-lite",
        "--tokens",
        "1T",
        "--inventory",
        &inv,
        "--deadline",
        "40d",
        "--domestic-share",
        "0.5",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let plans = report["feasible"].as_array().unwrap();
    assert!(!plans.is_empty());
    let mut last = 0.0;
    for p in plans {
        assert!(p["days"].as_f64().unwrap() <= 40.0);
        assert!(p["domestic_share"].as_f64().unwrap() >= 0.5);
        assert!(p["memory_headroom"].as_f64().unwrap() >= 0.1);
        let cost = p["total_cost"].as_f64().unwrap();
        assert!(cost >= last, "not sorted by cost");
        last = cost;
        // The cost is the device-hours times the prices.
        let hours = p["days"].as_f64().unwrap() * 24.0;
        let per_hour: f64 = p["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|part| {
                let price = match part["device"].as_str().unwrap() {
                    "A" => 7.0,
                    "D" => 27.5,
                    "E" => 5.64,
                    other => panic!("{other}"),
                };
                price * part["count"].as_f64().unwrap()
            })
            .sum();
        assert!((hours * per_hour - cost).abs() / cost < 1e-9);
    }
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    // The 4th-cheapest feasible plan is not cheaper than the best.
    assert!(
        plans[0]["cost_per_trillion"].as_f64().unwrap()
            <= plans[3]["cost_per_trillion"].as_f64().unwrap()
    );
}

#[test]
fn impossible_constraints_say_which_and_by_how_much() {
    let _alone = serial();
    let tmp = TempDir::new("plan-infeasible");
    let inv = inventory(tmp.path(), MIX);
    let out = nuwa(&["plan", "--inventory", &inv, "--deadline", "1d"]);
    assert_clean_error(&out, "deadline 1 d: the fastest plan that fits takes");
    assert_clean_error(&out, "over)");
    let only_d = inventory(
        tmp.path(),
        "currency = \"CNY\"\n[[device]]\nname = \"D\"\ncount = 512\ndomestic = false\n",
    );
    // 512 of D hold the default model (Ling-Lite) at 1024 tokens a sequence.
    let short = ["--seq-len", "1024"];
    let plan_d = |extra: &[&str]| {
        let mut args = vec!["plan", "--inventory", &only_d];
        args.extend_from_slice(extra);
        nuwa(&args)
    };
    let out = plan_d(&[&short[..], &["--domestic-share", "0.5"]].concat());
    assert_clean_error(&out, "at most 0% of a plan's devices can be domestic");
    let out = plan_d(&[&short[..], &["--budget", "1000"]].concat());
    assert_clean_error(&out, "budget 1.000e3: the cheapest plan that fits costs");
    // At 4096 they do not: nuwa train keeps every parameter's f32 weight, gradient and AdamW
    // moments on each device that holds it, and every layer's activations for the
    // micro-batches in flight (no recomputation). The line says what the best plan holds.
    let out = plan_d(&[]);
    assert_clean_error(&out, "no layout fits in memory: the best leaves");
    assert_clean_error(&out, "GB of f32 weights, gradients and AdamW moments");
    assert_clean_error(&out, "GB of activations, on 80 GB");
}

#[test]
fn bad_inventories_list_every_problem() {
    let _alone = serial();
    let tmp = TempDir::new("plan-bad");
    let inv = inventory(
        tmp.path(),
        "currency = \"USD\"\n[[device]]\nname = \"H900\"\ncount = 8\n\
         [[device]]\nname = \"H100-SXM\"\ncount = 8\n[[device]]\nname = \"A\"\ncount = 0\n",
    );
    let out = nuwa(&["plan", "--inventory", &inv]);
    for needle in [
        "4 problem(s)",
        "unknown device `H900`",
        "`H100-SXM`: price unknown",
        "`A`: count must be positive",
        "the catalogue price is in CNY, the inventory in USD",
    ] {
        assert_clean_error(&out, needle);
    }
    let garbled = inventory(
        tmp.path(),
        "currency = \"CNY\"\n[[device]]\nname = \"A\"\ncuont = 3\n",
    );
    assert_clean_error(
        &nuwa(&["plan", "--inventory", &garbled]),
        "unknown field `cuont`",
    );
}

#[test]
fn ant_example_reproduces_the_reported_arithmetic() {
    let _alone = serial();
    let out = nuwa(&["plan", "ant-example"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // ¥6.35M at ¥27.5 per device-hour is 230,909 device-hours.
    assert!(
        text.contains("| implied device-hours (cost ÷ price) | 230909 |"),
        "{text}"
    );
    let mfu: f64 = text
        .lines()
        .find(|l| l.contains("implied MFU"))
        .and_then(|l| l.split('|').nth(2))
        .and_then(|v| v.trim().trim_end_matches('%').parse().ok())
        .unwrap();
    assert!((15.0..30.0).contains(&mfu), "{mfu}");
    // Device D at that MFU costs what the report says.
    assert!(
        text.contains("| D | 989 | 27.5 | 230909 | 6.35M |"),
        "{text}"
    );
}

#[test]
fn predicted_step_time_is_within_15_percent_of_measured() {
    let _alone = serial();
    let tmp = TempDir::new("plan-verify");
    let cal = tmp.path().join("cal.json");
    // Calibration shapes A and B and the checked shape C-dense are timed in turn in one run, so
    // a shared CI machine's slow drifts reach prediction and measurement alike.
    let out = nuwa(&[
        "plan",
        "verify",
        "--shape",
        "C-dense",
        "--calibrate",
        "--calibration",
        cal.to_str().unwrap(),
        "--steps",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let err = r["relative_error"].as_f64().unwrap();
    assert!(err.abs() < 0.15, "predicted vs measured: {r}");
    // The calibration it used was saved: two measured points, MFU between 0 and 1.
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    let points = saved["devices"]
        .as_object()
        .and_then(|d| d.values().next())
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(points.len(), 2, "{saved}");
    for p in points {
        let mfu = p["mfu"].as_f64().unwrap();
        assert!(mfu > 0.0 && mfu < 1.0, "{saved}");
    }
}

#[test]
fn verifying_a_plan_run_says_where_its_prediction_came_from() {
    let tmp = TempDir::new("plan-verify-run");
    let plan = tmp.path().join("plan.toml");
    std::fs::write(
        &plan,
        "model = \"tiny-moe\"\nseq_len = 64\nglobal_batch = 16\n[layout]\nep = 2\ndp = 2\n\
         micro_batch = 4\n[[part]]\ndevice = \"local-cpu\"\ncount = 2\n",
    )
    .unwrap();
    // A finished run's metrics: four steps of 0.5 s on two ranks, each peaking at 100 MB, of
    // which 60 MB and 70 MB were held before the model.
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let step = |s: u64| {
        format!(
            "{{\"step\":{s},\"step_seconds\":0.5,\"ranks\":[\
             {{\"peak_rss_bytes\":1e8,\"rss_before_model_bytes\":6e7}},\
             {{\"peak_rss_bytes\":1e8,\"rss_before_model_bytes\":7e7}}]}}\n"
        )
    };
    std::fs::write(
        run.join("metrics.jsonl"),
        (1..=4).map(step).collect::<String>(),
    )
    .unwrap();
    let run_verify = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "verify",
            "--plan",
            plan.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        nuwa(&args)
    };
    let verify = |extra: &[&str]| {
        let out = run_verify(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        serde_json::from_str::<Value>(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
    };
    // No calibration: the default efficiency, said to be uncalibrated.
    let plain = verify(&[]);
    let from = plain["prediction_from"].as_str().unwrap();
    assert!(from.contains("UNCALIBRATED for local-cpu"), "{plain}");
    assert_eq!(plain["measured_step_s"].as_f64(), Some(0.5));
    // What the model took on each rank: its peak less what it held before the model.
    assert_eq!(
        plain["measured_model_bytes_per_rank"],
        serde_json::json!([4e7, 3e7])
    );
    // A calibration file giving this machine `mfu` at every size.
    let calibration = |file: &str, mfu: f64| {
        let path = tmp.path().join(file);
        let points = format!("[{{\"flops_per_step\":1e9,\"mfu\":{mfu}}}]");
        let text = format!("{{\"devices\":{{\"local-cpu\":{points}}}}}");
        std::fs::write(&path, text).unwrap();
        path
    };
    // A calibration at a quarter of the default efficiency: four times the predicted time.
    let cal = calibration("cal.json", 0.1);
    let calibrated = verify(&["--calibration", cal.to_str().unwrap()]);
    assert!(
        calibrated["prediction_from"]
            .as_str()
            .unwrap()
            .starts_with("calibrated ("),
        "{calibrated}"
    );
    let ratio = calibrated["predicted_step_s"].as_f64().unwrap()
        / plain["predicted_step_s"].as_f64().unwrap();
    assert!(
        ratio > 2.0,
        "a slower calibration predicts slower steps: {ratio}"
    );
    // Priced and stored in the plan (`plan predict --write`): verify takes the stored
    // prediction and says how it was priced; a --calibration given prices it again.
    let out = nuwa(&[
        "plan",
        "predict",
        "--plan",
        plan.to_str().unwrap(),
        "--calibration",
        cal.to_str().unwrap(),
        "--write",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = verify(&[]);
    let from = stored["prediction_from"].as_str().unwrap();
    assert!(
        from.starts_with("the plan's [predicted] (calibrated ("),
        "{stored}"
    );
    assert_eq!(stored["predicted_step_s"], calibrated["predicted_step_s"]);
    let cal2 = calibration("cal2.json", 0.2);
    let repriced = verify(&["--calibration", cal2.to_str().unwrap()]);
    assert!(
        repriced["predicted_step_s"].as_f64() < stored["predicted_step_s"].as_f64(),
        "{repriced}"
    );
    // A calibration that is not there is one clear line, not a silent default.
    let missing = tmp.path().join("missing.json");
    let out = run_verify(&["--calibration", missing.to_str().unwrap()]);
    assert_clean_error(&out, "missing.json");
}
