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
