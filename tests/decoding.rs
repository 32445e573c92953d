//! Incremental decoding: the KV cache gives the same logits as a full forward pass, and the
//! same seed gives the same sample.

use burn::tensor::{Device, Int, Tensor, TensorData};
use nuwa_model::{generate, KvCache, LanguageModel, ModelConfig, SamplingOptions};

fn model(preset: &str) -> (LanguageModel, Device) {
    let device = Device::default();
    let cfg = ModelConfig {
        vocab_size: 50,
        ..ModelConfig::preset(preset).unwrap()
    };
    (LanguageModel::new(&cfg, &device, 7), device)
}

fn tokens(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn cached_equals_uncached(preset: &str) {
    let (model, device) = model(preset);
    let ids: Vec<i64> = (0..12).map(|i| (i * 7 + 3) % 50).collect();
    let full = host(model.forward(tokens(&ids, &device), None).logits);

    // Prefill 5 tokens, then feed the rest one at a time.
    let mut cache = KvCache::new(model.num_layers());
    let mut cached = host(
        model
            .forward(tokens(&ids[..5], &device), Some(&mut cache))
            .logits,
    );
    for &id in &ids[5..] {
        cached.extend(host(
            model
                .forward(tokens(&[id], &device), Some(&mut cache))
                .logits,
        ));
    }
    assert_eq!(cache.len(), ids.len());
    assert_eq!(full.len(), cached.len());
    let max = full
        .iter()
        .zip(&cached)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "{preset}: cached logits differ by {max:e}");
}

#[test]
fn kv_cache_matches_full_forward_dense() {
    cached_equals_uncached("tiny-dense");
}

#[test]
fn kv_cache_matches_full_forward_moe() {
    cached_equals_uncached("tiny-moe");
}

#[test]
fn same_seed_same_sample_and_greedy_is_cache_consistent() {
    let (model, device) = model("tiny-moe");
    let prompt = [1u32, 2, 3];
    let opts = SamplingOptions {
        max_tokens: 20,
        temperature: 1.0,
        top_k: 10,
        top_p: 0.9,
        seed: 5,
        window: 0,
    };
    let a = generate(&model, &prompt, &opts, &device, |_| {});
    let b = generate(&model, &prompt, &opts, &device, |_| {});
    assert_eq!(a, b);
    assert_eq!(a.len(), 20);
    let other = generate(
        &model,
        &prompt,
        &SamplingOptions { seed: 6, ..opts },
        &device,
        |_| {},
    );
    assert_ne!(a, other, "a different seed should give a different sample");

    // A window shorter than the output: the cache is rebuilt and decoding goes on.
    let windowed = SamplingOptions {
        window: 8,
        max_tokens: 30,
        ..opts
    };
    let long = generate(&model, &prompt, &windowed, &device, |_| {});
    assert_eq!(long.len(), 30);
    assert_eq!(long, generate(&model, &prompt, &windowed, &device, |_| {}));

    // Greedy decoding with the cache equals argmax of full forward passes.
    let greedy = SamplingOptions {
        temperature: 0.0,
        max_tokens: 8,
        ..opts
    };
    let fast = generate(&model, &prompt, &greedy, &device, |_| {});
    let mut seq: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    for &expected in &fast {
        let logits = model.forward(tokens(&seq, &device), None).logits;
        let [_, t, v] = logits.dims();
        let last = logits
            .narrow(1, t - 1, 1)
            .reshape([v])
            .argmax(0)
            .into_scalar::<i64>();
        assert_eq!(last as u32, expected);
        seq.push(last);
    }
}

/// Rows of a [`DecodeBatch`] joining and leaving at different times decode exactly what each
/// would alone (logits within float tolerance, hence the same greedy tokens).
#[test]
fn batched_rows_decode_like_single_sequences() {
    use nuwa_model::batch::DecodeBatch;
    for preset in ["tiny-dense", "tiny-moe"] {
        let (model, device) = model(preset);
        // Row 1's 60-token prompt makes the shared caches grow past 64 positions mid-run.
        let long: Vec<u32> = (0..60).map(|i| (i * 7) % 49 + 1).collect();
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], long, vec![42]];
        let greedy = |l: &[f32]| {
            l.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap()
        };
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let opts = SamplingOptions {
                    max_tokens: 10,
                    temperature: 0.0,
                    ..Default::default()
                };
                generate(&model, p, &opts, &device, |_| {})
            })
            .collect();
        // Row 0 starts alone; row 1 joins after 3 steps, row 2 after 5; row 0 leaves at 10.
        let mut batch = DecodeBatch::new(&model, &device);
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut live: Vec<usize> = Vec::new();
        let mut next: Vec<u32> = Vec::new();
        for step in 0..16 {
            for (who, at) in [(0, 0), (1, 3), (2, 5)] {
                if step == at {
                    let logits = batch.join(&model, &prompts[who]);
                    live.push(who);
                    next.push(greedy(&logits));
                }
            }
            for (slot, &who) in live.iter().enumerate() {
                out[who].push(next[slot]);
            }
            let keep: Vec<bool> = live.iter().map(|&w| out[w].len() < 10).collect();
            batch.retain(&keep);
            let kept: Vec<(usize, u32)> = live
                .iter()
                .zip(&next)
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|((w, n), _)| (*w, *n))
                .collect();
            live = kept.iter().map(|k| k.0).collect();
            if live.is_empty() {
                break;
            }
            let tokens: Vec<u32> = kept.iter().map(|k| k.1).collect();
            next = batch
                .step(&model, &tokens)
                .iter()
                .map(|l| greedy(l))
                .collect();
        }
        assert_eq!(out, alone, "{preset}");
    }
}

/// The one forward path through a contiguous store, projecting only the last position, gives
/// the full forward pass's last row; the RoPE tables are built once per device.
#[test]
fn last_position_logits_equal_the_full_forward_and_rope_is_built_once() {
    use nuwa_model::batch::token_rows;
    use nuwa_model::{KvStore, Logits};
    let (model, device) = model("tiny-moe");
    let ids: Vec<u32> = (0..9).map(|i| (i * 5 + 1) % 50).collect();
    let full = host(model.forward(token_rows(&ids, 1, &device), None).logits);
    let last_row = &full[full.len() - 50..];

    // Through a contiguous store, in two chunks: prefill 6, then 3 more.
    let mut cache = KvCache::new(model.num_layers());
    let store = Some(&mut cache as &mut dyn KvStore);
    let first = model.forward_with(token_rows(&ids[..6], 1, &device), store, Logits::Last);
    assert_eq!(first.logits.dims(), [1, 1, 50]);
    let store = Some(&mut cache as &mut dyn KvStore);
    let out = model.forward_with(token_rows(&ids[6..], 1, &device), store, Logits::Last);
    assert_eq!(cache.len(), 9);
    let max = host(out.logits)
        .iter()
        .zip(last_row)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "last-position logits differ by {max:e}");
    // Three forward passes on one device: one set of tables.
    assert_eq!(model.rope.devices_built(), 1);
}
