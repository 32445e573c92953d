//! Hugging Face checkpoints: nuwa's logits and greedy tokens against the PyTorch reference
//! (`tests/reference/hf_reference.py`, which also matches `transformers` itself, see
//! `check_transformers.py`) for every supported architecture; bit-exact export → re-import;
//! bad checkpoints reported in full; chat templates and end-of-sequence tokens.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{assert_clean_error, nuwa, TempDir};
use nuwa_hf::safetensors_dir::SafetensorsDir;
use nuwa_hf::{
    export_run, import_to_run, ExportDtype, ExportOptions, HfCheckpoint, InferenceModel, Message,
    ModelSource,
};
use nuwa_model::SamplingOptions;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One fixture folder per architecture, named after its `model_type`, Ling again with Ant's
/// defaults for absent keys, top-1 routing and no shared experts (zero-wide tensors), and Ling
/// 2.0 (sigmoid group-limited routing with expert bias, QK-norm, half RoPE).
/// The Ling fixtures also match Ant's own code (`tests/reference/check_ant.py`).
const ARCHS: [&str; 7] = [
    "bailing_moe",
    "bailing_moe_defaults",
    "bailing_moe_v2",
    "llama",
    "qwen2",
    "qwen3_moe",
    "mixtral",
];

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/hf/{arch}"))
}

struct Expected {
    input_ids: Vec<i64>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn expected(arch: &str) -> Expected {
    let bytes = std::fs::read(fixture(arch).join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |name: &str| -> Vec<i64> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Expected {
        input_ids: i64s("input_ids"),
        logits,
        greedy: i64s("greedy").into_iter().map(|t| t as u32).collect(),
    }
}

#[test]
fn logits_and_greedy_tokens_match_the_reference_for_every_architecture() {
    let device = Device::default();
    for arch in ARCHS {
        let want = expected(arch);
        let ckpt = HfCheckpoint::open(&fixture(arch)).unwrap();
        assert!(arch.starts_with(ckpt.arch.model_type()), "{arch}");
        let model = ckpt.load_model(&device).unwrap();
        let n = want.input_ids.len();
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(want.input_ids.clone(), [1, n]), &device);
        let logits: Vec<f32> = model
            .forward(ids, None)
            .logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(logits.len(), want.logits.len(), "{arch}");
        let max_diff = logits
            .iter()
            .zip(&want.logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 1e-4, "{arch}: max |Δ logits| = {max_diff}");

        let prompt: Vec<u32> = want.input_ids.iter().map(|&t| t as u32).collect();
        let opts = SamplingOptions {
            max_tokens: want.greedy.len(),
            temperature: 0.0,
            window: ckpt.config.max_position_embeddings,
            ..Default::default()
        };
        let greedy = nuwa_model::generate(&model, &prompt, &opts, &device, |_| {});
        assert_eq!(greedy, want.greedy, "{arch}: greedy tokens differ");
    }
}

/// Every tensor of an HF folder, as f32.
fn hf_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let st = SafetensorsDir::open(dir).unwrap();
    st.tensors
        .iter()
        .map(|(name, e)| (name.clone(), e.shape.clone(), st.read_f32(name).unwrap()))
        .collect()
}

#[test]
fn import_then_export_round_trips_bit_exact() {
    let device = Device::default();
    let tmp = TempDir::new("hf-roundtrip");
    for arch in ARCHS {
        let run = tmp.path().join(format!("run-{arch}"));
        let out = tmp.path().join(format!("hf-{arch}"));
        import_to_run(&fixture(arch), &run, &device).unwrap();
        export_run(&run, &out, &ExportOptions::default()).unwrap();
        // The exported folder holds exactly the original tensors (values upcast to f32) ...
        assert_eq!(hf_tensors(&out), hf_tensors(&fixture(arch)), "{arch}");
        // ... and re-imports to exactly the weights nuwa imported the first time.
        let first = HfCheckpoint::open(&fixture(arch))
            .unwrap()
            .load_weights()
            .unwrap();
        let again = HfCheckpoint::open(&out).unwrap();
        assert_eq!(again.load_weights().unwrap(), first, "{arch}");
        let original: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(arch).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(again.hf_config["model_type"], original["model_type"]);
        assert_eq!(
            again.hf_config["eos_token_id"], original["eos_token_id"],
            "{arch}"
        );
    }
    // A second export into the same folder is refused; the first is left as it was.
    let run = tmp.path().join("run-llama");
    let out = tmp.path().join("hf-llama");
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let err = export_run(&run, &out, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn a_large_export_is_sharded_with_an_index_and_reimports_exactly() {
    let tmp = TempDir::new("hf-sharded");
    let run = tmp.path().join("run");
    let out = tmp.path().join("hf");
    import_to_run(&fixture("qwen3_moe"), &run, &Device::default()).unwrap();
    let args = [
        "export",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let bad = nuwa(&[&args[..], &["--max-shard-size", "5XB"]].concat());
    assert_clean_error(&bad, "--max-shard-size");
    let ok = nuwa(&[&args[..], &["--max-shard-size", "20KB"]].concat());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shards: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    for shard in &shards {
        let size = std::fs::metadata(out.join(shard)).unwrap().len();
        let st = std::fs::read(out.join(shard)).unwrap();
        let tensors = SafeTensors::deserialize(&st).unwrap().len();
        // Only a shard holding a single tensor larger than the limit may pass it.
        assert!(
            size <= 20_000 + 4096 || tensors == 1,
            "{shard}: {size} bytes"
        );
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mapped = index["weight_map"].as_object().unwrap();
    assert_eq!(mapped.len(), hf_tensors(&fixture("qwen3_moe")).len());
    // Sharded, the export still holds exactly the original tensors.
    assert_eq!(hf_tensors(&out), hf_tensors(&fixture("qwen3_moe")));
}

#[test]
fn bf16_export_rounds_to_bf16() {
    let tmp = TempDir::new("hf-bf16");
    let run = tmp.path().join("run");
    let out = tmp.path().join("hf");
    import_to_run(&fixture("llama"), &run, &Device::default()).unwrap();
    export_run(
        &run,
        &out,
        &ExportOptions {
            dtype: ExportDtype::Bf16,
            ..Default::default()
        },
    )
    .unwrap();
    let st = SafetensorsDir::open(&out).unwrap();
    assert!(st.tensors.values().all(|e| e.dtype == Dtype::BF16));
    for (name, _, want) in hf_tensors(&fixture("llama")) {
        let got = st.read_f32(&name).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() / 128.0, "{name}: {g} vs {w}");
        }
    }
}

/// Copies the llama fixture, then rewrites its weights through `edit`.
fn broken_llama(
    tmp: &TempDir,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let dir = tmp.path().join("broken");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama").join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let body = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
    std::fs::write(dir.join("model.safetensors"), body).unwrap();
    dir
}

#[test]
fn a_broken_checkpoint_lists_every_problem() {
    let tmp = TempDir::new("hf-broken");
    let dir = broken_llama(&tmp, |t| {
        t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight");
        t.push((
            "model.layers.9.extra.weight".into(),
            Dtype::F32,
            vec![2],
            vec![0; 8],
        ));
        for (n, d, s, b) in t.iter_mut() {
            if n == "model.norm.weight" {
                *s = vec![16];
                b.truncate(64);
            }
            if n == "model.layers.0.input_layernorm.weight" {
                *d = Dtype::I32;
            }
        }
    });
    let out = nuwa(&[
        "import",
        dir.to_str().unwrap(),
        "--out",
        tmp.path().join("run").to_str().unwrap(),
    ]);
    for needle in [
        "4 problem(s)",
        "missing tensor model.layers.1.mlp.up_proj.weight",
        "unexpected tensor model.layers.9.extra.weight",
        "model.norm.weight has shape [16]",
        "input_layernorm.weight has dtype I32",
    ] {
        assert_clean_error(&out, needle);
    }
    assert!(!tmp.path().join("run").join("checkpoints").exists());
}

#[test]
fn truncated_weights_unknown_types_and_bad_configs_are_refused() {
    let tmp = TempDir::new("hf-bad");
    let dir = broken_llama(&tmp, |_| {});
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let out = nuwa(&["sample", "--init-from", dir.to_str().unwrap()]);
    assert_clean_error(&out, "truncated");

    std::fs::write(&weights, &bytes).unwrap();
    let config_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    cfg["model_type"] = "gpt_neox".into();
    std::fs::write(&config_path, cfg.to_string()).unwrap();
    let out = nuwa(&["sample", "--init-from", dir.to_str().unwrap()]);
    assert_clean_error(&out, "model_type `gpt_neox` is not supported");

    cfg["model_type"] = "llama".into();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    cfg["hidden_act"] = "gelu".into();
    std::fs::write(&config_path, cfg.to_string()).unwrap();
    let out = nuwa(&[
        "import",
        dir.to_str().unwrap(),
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert_clean_error(&out, "2 problem(s)");
    assert_clean_error(&out, "rope type `yarn`");

    std::fs::write(&config_path, "{ not json").unwrap();
    let out = nuwa(&[
        "import",
        dir.to_str().unwrap(),
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert_clean_error(&out, "config.json: not valid JSON");
}

#[test]
fn chat_template_and_end_of_sequence_come_from_the_checkpoint() {
    let device = Device::default();
    let mut m = InferenceModel::load(&ModelSource::Hf(fixture("llama")), &device).unwrap();
    let ids = m
        .encode_chat(&[Message {
            role: "user".into(),
            content: "w5 w6".into(),
        }])
        .unwrap();
    // "<|im_start|> user w5 w6 <|im_end|> <|im_start|> assistant": ids by hand from the
    // fixture vocabulary (8 named tokens, then w0 = 8, w1 = 9, ...).
    assert_eq!(ids, [3, 5, 13, 14, 4, 3, 6]);
    assert_eq!(m.eos, [2]);

    // Generation stops at an end-of-sequence token and leaves it out.
    let want = expected("llama");
    let prompt: Vec<u32> = want.input_ids.iter().map(|&t| t as u32).collect();
    let opts = SamplingOptions {
        max_tokens: 32,
        temperature: 0.0,
        ..Default::default()
    };
    m.eos = vec![want.greedy[5]];
    let first = want
        .greedy
        .iter()
        .position(|&t| t == want.greedy[5])
        .unwrap();
    let out = m.generate(&prompt, &opts, &device, |_| {});
    assert_eq!(out, want.greedy[..first]);

    // The CLI path: an imported run keeps the template.
    let tmp = TempDir::new("hf-chat");
    let run = tmp.path().join("run");
    let out = nuwa(&[
        "import",
        fixture("llama").to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = nuwa(&[
        "sample",
        "--run",
        run.to_str().unwrap(),
        "--chat",
        "--prompt",
        "w5 w6",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .count(),
        4
    );
}

#[test]
fn fine_tuning_from_a_checkpoint_starts_from_its_weights_and_exports_as_its_type() {
    for arch in ["llama", "bailing_moe_v2"] {
        fine_tune(arch);
    }
}

/// Fine-tunes the `arch` fixture on words of its own vocabulary and exports the result.
fn fine_tune(arch: &str) {
    let tmp = TempDir::new("hf-finetune");
    let text: String = (0..3000).map(|i| format!("w{} ", (i * 7) % 40)).collect();
    let txt = tmp.path().join("words.txt");
    std::fs::write(&txt, text).unwrap();
    let data = tmp.path().join("data");
    let tok = fixture(arch).join("tokenizer.json");
    let out = nuwa(&[
        "data",
        "prepare",
        "--input",
        txt.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("run");
    let out = nuwa(&[
        "train",
        "--init-from",
        fixture(arch).to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "30",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--run-dir",
        run.to_str().unwrap(),
        "--quiet",
        "--sample-tokens",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first step's loss is the imported model's, not a fresh initialisation's (~ln 96 = 4.56).
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect();
    assert!(
        (losses[0] - 4.56).abs() > 0.1,
        "{arch}: first loss {} looks freshly initialised",
        losses[0]
    );
    assert!(losses.last().unwrap() < &(losses[0] - 0.5), "{losses:?}");
    let hf = tmp.path().join("hf");
    let out = nuwa(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ckpt = HfCheckpoint::open(&hf).unwrap();
    assert_eq!(ckpt.arch.model_type(), arch);
    assert_eq!(ckpt.hf_config["eos_token_id"], 2);
    assert!(
        ckpt.load_weights().unwrap()
            != HfCheckpoint::open(&fixture(arch))
                .unwrap()
                .load_weights()
                .unwrap()
    );
}

#[test]
fn sample_prints_log_probabilities_that_match_the_reference_logits() {
    // Greedy from the prompt: the first token's log-probability is the log-softmax of the
    // reference's logits at the prompt's last position.
    let want = expected("bailing_moe");
    let prompt: Vec<String> = want.input_ids.iter().map(|i| i.to_string()).collect();
    let vocab = want.logits.len() / want.input_ids.len();
    let last = &want.logits[want.logits.len() - vocab..];
    let reference = nuwa_model::token_logprobs(last, want.greedy[0], 3);
    let tmp = TempDir::new("sample-logprobs");
    let run = tmp.path().join("run");
    import_to_run(&fixture("bailing_moe"), &run, &Device::default()).unwrap();
    // The fixture has no tokenizer: a byte tokenizer over the ids < 256 stands in.
    std::fs::write(run.join("tokenizer.nuwa.json"), r#"{"kind":"byte"}"#).unwrap();
    let text: String = want
        .input_ids
        .iter()
        .map(|&i| char::from(i as u8))
        .collect();
    let out = nuwa(&[
        "sample",
        "--run",
        run.to_str().unwrap(),
        "--prompt",
        &text,
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--logprobs",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{prompt:?}");
    let ids: Vec<u32> = lines
        .iter()
        .map(|l| l["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want.greedy[..4]);
    let first = lines[0]["logprob"].as_f64().unwrap() as f32;
    assert!(
        (first - reference.logprob).abs() < 1e-4,
        "{first} vs {}",
        reference.logprob
    );
    let top: Vec<u32> = lines[0]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(top, reference.top.iter().map(|t| t.0).collect::<Vec<_>>());
}
