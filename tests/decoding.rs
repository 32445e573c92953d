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

/// Sequences in a paged batch — joining at different times, prompts prefilled in chunks mixed
/// into decode steps, one prompt sharing another's cached prefix, one choice forked — decode
/// exactly what each would alone (the same greedy tokens), on the paged-attention kernel and
/// on the reference path (blocks gathered into Burn's attention).
#[test]
fn paged_batch_decodes_like_single_sequences() {
    for preset in ["tiny-dense", "tiny-moe"] {
        let (model, device) = model(preset);
        paged_run(&model, &device, preset);
        nuwa_model::kernels::with_reference_path(|| paged_run(&model, &device, preset));
    }
}

fn paged_run(model: &LanguageModel, device: &Device, preset: &str) {
    use nuwa_model::batch::{Chunk, PagedBatch};
    let greedy = |l: &[f32]| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap()
    };
    // Prompt 1 crosses several 16-position blocks; prompt 3 shares its first 40 tokens (two
    // full blocks come from the cache) and arrives after it is done.
    let long: Vec<u32> = (0..60).map(|i| (i * 7) % 49 + 1).collect();
    let mut shared = long[..40].to_vec();
    shared.extend([5, 6, 7]);
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], long, vec![42], shared];
    let arrivals = [0, 3, 5, 40];
    let new_tokens = 10;
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let opts = SamplingOptions {
                max_tokens: new_tokens,
                temperature: 0.0,
                ..Default::default()
            };
            generate(model, p, &opts, device, |_| {})
        })
        .collect();
    // A pool far smaller than 4 × context: admission is by blocks.
    let per_block = PagedBatch::shape(model).bytes_per_block();
    let mut batch = PagedBatch::new(model, device, 24 * per_block);
    // Per sequence: (who, id, prompt position done, next token).
    let mut live: Vec<(usize, u64, usize, Option<u32>)> = Vec::new();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut cached_tokens = vec![0; prompts.len()];
    for step in 0..80 {
        for (who, &at) in arrivals.iter().enumerate() {
            if step == at {
                let (id, cached) = batch
                    .admit(&prompts[who], prompts[who].len() + new_tokens)
                    .expect("room");
                cached_tokens[who] = cached;
                live.push((who, id, cached, None));
            }
        }
        // Emit pending tokens; finished sequences leave.
        live.retain(|&(who, id, _, next)| {
            if let Some(t) = next {
                out[who].push(t);
            }
            let done = out[who].len() == new_tokens;
            if done {
                batch.release(id);
            }
            !done
        });
        // Decode rows take one token; prompts go in chunks of 7.
        let chunks: Vec<Chunk> = live
            .iter()
            .map(|(who, id, done, next)| match next {
                Some(t) => Chunk {
                    seq: *id,
                    tokens: std::slice::from_ref(t),
                    logits: true,
                },
                None => {
                    let end = prompts[*who].len().min(done + 7);
                    Chunk {
                        seq: *id,
                        tokens: &prompts[*who][*done..end],
                        logits: end == prompts[*who].len(),
                    }
                }
            })
            .collect();
        if chunks.is_empty() {
            continue;
        }
        let wanted: Vec<bool> = chunks.iter().map(|c| c.logits).collect();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.tokens.len()).collect();
        let mut logits = batch.run(model, &chunks).into_iter();
        for ((entry, wants), n) in live.iter_mut().zip(wanted).zip(sizes) {
            if entry.3.is_none() {
                entry.2 += n;
            }
            if wants {
                entry.3 = Some(greedy(&logits.next().unwrap()));
            }
        }
    }
    assert_eq!(out, alone, "{preset}");
    assert_eq!(
        cached_tokens,
        vec![0, 0, 0, 32],
        "{preset}: two full blocks shared"
    );
    assert_eq!(batch.usage().used, 0, "{preset}: every block given back");
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
