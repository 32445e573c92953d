//! Autoregressive sampling with a KV cache: temperature, top-k and top-p (nucleus), seeded.

use crate::batch::token_rows;
use crate::model::Logits;
use crate::{KvCache, LanguageModel};
use burn::tensor::Device;
use nuwa_core::rng::SplitMix;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f64,
    pub seed: u64,
    /// Most positions attended to (0: the model's `max_position_embeddings`).
    pub window: usize,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            max_tokens: 200,
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            window: 0,
        }
    }
}

/// A token's log-probability under the model (the log-softmax of its raw logits: before any
/// temperature, top-k or top-p), and the `top` most likely tokens with theirs.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprobs`] of `token` in one row of logits.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let logprob = |i: usize| (logits[i] as f64 - lse) as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(logits.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| {
            logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
        });
        order.truncate(top);
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    } else {
        order.clear();
    }
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |_| logprob(token as usize)),
        top: order.into_iter().map(|i| (i as u32, logprob(i))).collect(),
    }
}

/// Picks the next token from one row of logits.
pub fn pick_token(logits: &[f32], opts: &SamplingOptions, rng_state: &mut u64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    if opts.top_k == 0 && opts.top_p >= 1.0 {
        return sample_all(logits, opts.temperature, rng_state).unwrap_or_else(argmax);
    }
    // Only top-k and top-p need the tokens by likelihood: without them every token stays a
    // candidate, in vocabulary order (sorting a vocabulary per token costs more than the
    // model's decode step at large batch). With top-k, only the k best are sorted.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    if opts.top_k > 0 && opts.top_k < order.len() {
        order.select_nth_unstable_by(opts.top_k - 1, by_logit);
        order.truncate(opts.top_k);
        order.sort_by(by_logit);
    } else if opts.top_p < 1.0 {
        order.sort_by(by_logit);
    }
    if order.is_empty() {
        return argmax();
    }
    let max = order
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / opts.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= opts.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut rng = SplitMix(*rng_state);
    let r = rng.next_f64();
    *rng_state = rng.0;
    let mut cumulative = 0.0;
    for (p, &i) in probs.iter().zip(&order) {
        cumulative += p;
        if r < cumulative {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

/// Samples from the whole vocabulary at `temperature`, in vocabulary order: the weights
/// `e^((l − max) / T)` in f32 with a vectorisable `exp` (a pass over the vocabulary per token
/// that libm's f64 `exp` made cost more than a batched decode step), summed in f64. `None` if
/// no logit is finite.
fn sample_all(logits: &[f32], temperature: f64, rng_state: &mut u64) -> Option<u32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let inv = (1.0 / temperature) as f32;
    let weights: Vec<f32> = logits
        .iter()
        .map(|&l| crate::kernels::exp((l - max) * inv))
        .collect();
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let mut rng = SplitMix(*rng_state);
    let target = rng.next_f64() * total;
    *rng_state = rng.0;
    let mut cumulative = 0.0;
    let mut last = None;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last = Some(i as u32);
        }
        cumulative += w as f64;
        if target < cumulative {
            return Some(i as u32);
        }
    }
    last
}

/// Continues `prompt` by `opts.max_tokens` tokens. The model attends to at most `opts.window`
/// positions (0: `max_position_embeddings`): when the cache is full it is rebuilt from the
/// last half-window of tokens, so a model trained on short contexts never sees positions it
/// was not trained on. `on_token` sees each new token as it is produced (for streaming).
pub fn generate(
    model: &LanguageModel,
    prompt: &[u32],
    opts: &SamplingOptions,
    device: &Device,
    on_token: impl FnMut(u32),
) -> Vec<u32> {
    generate_until(model, prompt, opts, &[], device, on_token)
}

/// [`generate`], stopping after any token in `stop` (an end-of-sequence id), which is kept
/// as the last token of the output.
pub fn generate_until(
    model: &LanguageModel,
    prompt: &[u32],
    opts: &SamplingOptions,
    stop: &[u32],
    device: &Device,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    generate_scored(model, prompt, opts, stop, device, |t, _| on_token(t))
}

/// [`generate_until`], handing `on_token` each new token with the row of logits it was
/// picked from (for log-probabilities).
pub fn generate_scored(
    model: &LanguageModel,
    prompt: &[u32],
    opts: &SamplingOptions,
    stop: &[u32],
    device: &Device,
    mut on_token: impl FnMut(u32, &[f32]),
) -> Vec<u32> {
    let window = match opts.window {
        0 => model.max_positions,
        w => w.min(model.max_positions),
    }
    .max(2);
    let mut rng_state = opts.seed;
    let mut out = Vec::new();
    if prompt.is_empty() {
        return out;
    }
    let mut all: Vec<u32> = prompt.to_vec();
    let mut cache = KvCache::new(model.num_layers());
    let prefill = |cache: &mut KvCache, tokens: &[u32]| -> Vec<f32> {
        let tokens = token_rows(tokens, 1, device);
        let out = model.forward_with(tokens, Some(cache), Logits::Last);
        crate::batch::host_f32(out.logits)
    };
    let mut logits = prefill(&mut cache, &all[all.len().saturating_sub(window)..]);
    for i in 0..opts.max_tokens {
        let next = pick_token(&logits, opts, &mut rng_state);
        out.push(next);
        all.push(next);
        on_token(next, &logits);
        if i + 1 == opts.max_tokens || stop.contains(&next) {
            break;
        }
        logits = if cache.len() + 1 > window {
            cache = KvCache::new(model.num_layers());
            prefill(&mut cache, &all[all.len() - window / 2..])
        } else {
            prefill(&mut cache, &[next])
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sampling the whole vocabulary draws each token as often as its softmax probability at
    /// the temperature says (and never a token at −∞).
    #[test]
    fn full_vocabulary_sampling_follows_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, f32::NEG_INFINITY, 0.5];
        let opts = SamplingOptions {
            temperature: 0.7,
            ..Default::default()
        };
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64 / 0.7).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut counts = [0usize; 5];
        let mut rng = 42;
        let n = 40_000;
        for _ in 0..n {
            counts[pick_token(&logits, &opts, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        for (c, w) in counts.iter().zip(&weights) {
            let (got, want) = (*c as f64 / n as f64, w / total);
            assert!((got - want).abs() < 0.01, "{got} vs {want}");
        }
    }

    #[test]
    fn greedy_and_top_k_one_agree() {
        let logits = [0.1, 2.0, -1.0, 1.5];
        let mut s = 7;
        let greedy = SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(pick_token(&logits, &greedy, &mut s), 1);
        let top1 = SamplingOptions {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..10 {
            assert_eq!(pick_token(&logits, &top1, &mut s), 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        let logits = [5.0, 5.0, -10.0, -10.0];
        let opts = SamplingOptions {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        let mut s = 1;
        for _ in 0..50 {
            assert!(pick_token(&logits, &opts, &mut s) < 2);
        }
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_top_is_sorted() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = token_logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        let total: f64 = (0..4)
            .map(|i| (token_logprobs(&logits, i, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
