//! nuwa's layers against the independent PyTorch reference in `tests/reference/reference.py`:
//! forward outputs and gradients, from committed fixtures.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use nuwa_model::layers::{apply_rope, rope_tables, Attention, RmsNorm};
use nuwa_model::moe::Moe;
use nuwa_model::names::upgrade_names;
use nuwa_model::weights::{assign_weights, from_safetensors, HostTensor};
use nuwa_model::{ModelConfig, ModulePath};
use std::collections::BTreeMap;

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> BTreeMap<String, HostTensor> {
    let path = format!(
        "{}/tests/fixtures/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    from_safetensors(&bytes, &path).unwrap()
}

/// `NUWA_TEST_DEVICE` (cpu, flex, ndarray, wgpu:N) or the build's default device: CI runs
/// these tests once per backend a build holds.
fn base_device() -> Device {
    let name = std::env::var("NUWA_TEST_DEVICE").unwrap_or_default();
    match name.as_str() {
        "" | "cpu" => Device::default(),
        #[cfg(feature = "flex")]
        "flex" => Device::flex(),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        "ndarray" => Device::ndarray(),
        #[cfg(feature = "wgpu")]
        wgpu if wgpu.starts_with("wgpu:") => {
            let index: usize = wgpu[5..].parse().expect("NUWA_TEST_DEVICE=wgpu:N");
            Device::enumerate(burn::tensor::DeviceType::Wgpu)
                .get(index)
                .cloned()
                .unwrap_or_else(|| panic!("NUWA_TEST_DEVICE={name}: no such wgpu adapter"))
        }
        other => panic!("NUWA_TEST_DEVICE={other}: not a device this build holds"),
    }
}

fn device() -> Device {
    base_device().autodiff()
}

fn tensor<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

/// The fixture's tensors under `prefix`, without it. The fixtures keep checkpoint format 1's
/// names (`mlp.Moe.experts.E.…`); they are converted as a run folder is on load, so these
/// tests also check the conversion on real numbers.
fn with_prefix(f: &BTreeMap<String, HostTensor>, prefix: &str) -> BTreeMap<String, HostTensor> {
    let v1 = f
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect();
    upgrade_names(v1).unwrap()
}

/// [`with_prefix`] for a lone MoE module, whose fixture names have no layer path.
fn moe_with_prefix(f: &BTreeMap<String, HostTensor>, prefix: &str) -> BTreeMap<String, HostTensor> {
    let in_a_layer = f
        .iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix(prefix)?;
            Some((format!("layers.0.mlp.Moe.{k}"), v.clone()))
        })
        .collect();
    let upgraded = upgrade_names(in_a_layer).unwrap();
    upgraded
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("layers.0.moe.")?.to_string(), v)))
        .collect()
}

fn assert_close(what: &str, actual: &HostTensor, expected: &HostTensor) {
    assert_eq!(actual.shape, expected.shape, "{what}: shape");
    let max = actual
        .data
        .iter()
        .zip(&expected.data)
        .map(|(a, e)| (a - e).abs() / (1.0 + e.abs()))
        .fold(0f32, f32::max);
    assert!(
        max < TOL,
        "{what}: max relative error {max:e} exceeds {TOL:e}"
    );
}

/// Gradients of every parameter, by module path.
struct GradsByPath<'a> {
    grads: &'a Gradients,
    path: ModulePath,
    out: BTreeMap<String, HostTensor>,
}

impl ModuleVisitor for GradsByPath<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            self.out
                .insert(self.path.current(), HostTensor::from_tensor(g));
        }
    }
}

/// Compares every parameter gradient with the reference gradients `expected` (the fixture's
/// `grad.` tensors); `inputs` is how many of them belong to inputs rather than weights.
fn check_param_grads<M: Module>(
    module: &M,
    grads: &Gradients,
    expected: BTreeMap<String, HostTensor>,
    inputs: usize,
) {
    let mut v = GradsByPath {
        grads,
        path: ModulePath::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    let mut checked = 0;
    for (name, g) in &v.out {
        let e = expected
            .get(name)
            .unwrap_or_else(|| panic!("no reference gradient for {name}"));
        assert_close(&format!("grad {name}"), g, e);
        checked += 1;
    }
    assert_eq!(
        checked + inputs,
        expected.len(),
        "every weight gradient compared"
    );
}

fn assert_input_grad<const D: usize>(
    x: &Tensor<D>,
    grads: &Gradients,
    f: &BTreeMap<String, HostTensor>,
) {
    let grad = x.grad(grads).expect("the input requires a gradient");
    assert_close("grad x", &HostTensor::from_tensor(grad), &f["grad.x"]);
}

fn probe_loss<const D: usize>(
    y: Tensor<D>,
    f: &BTreeMap<String, HostTensor>,
    device: &Device,
) -> Tensor<1> {
    (y * tensor::<D>(&f["output.probe"], device)).sum()
}

#[test]
fn rmsnorm_matches_reference() {
    let f = fixture("rmsnorm");
    let dev = device();
    let norm = RmsNorm::new(16, 1e-6, &dev);
    let norm = assign_weights(norm, &with_prefix(&f, "weight."), "rmsnorm").unwrap();
    let x = tensor::<3>(&f["input.x"], &dev).require_grad();
    let y = norm.forward(x.clone());
    assert_close("y", &HostTensor::from_tensor(y.clone()), &f["output.y"]);
    let grads = probe_loss(y, &f, &dev).backward();
    assert_input_grad(&x, &grads, &f);
    check_param_grads(&norm, &grads, with_prefix(&f, "grad."), 1);
}

#[test]
fn rope_matches_reference() {
    let f = fixture("rope");
    let dev = device();
    let x = tensor::<4>(&f["input.x"], &dev).require_grad();
    let (cos, sin) = rope_tables(10000.0, 8, 3, 7, &dev);
    let y = apply_rope(x.clone(), &cos.unsqueeze(), &sin.unsqueeze());
    assert_close("y", &HostTensor::from_tensor(y.clone()), &f["output.y"]);
    let grads = probe_loss(y, &f, &dev).backward();
    assert_input_grad(&x, &grads, &f);
}

fn small_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 16,
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        use_qkv_bias: true,
        ..ModelConfig::preset("tiny-dense").unwrap()
    }
}

#[test]
fn attention_matches_reference() {
    let f = fixture("attention");
    let dev = device();
    let attn = Attention::new(&small_config(), &dev);
    let attn = assign_weights(attn, &with_prefix(&f, "weight."), "attention").unwrap();
    let x = tensor::<3>(&f["input.x"], &dev).require_grad();
    let (cos, sin) = rope_tables(10000.0, 8, 0, 6, &dev);
    let y = attn.forward(x.clone(), &cos.unsqueeze(), &sin.unsqueeze(), 0, None);
    assert_close("y", &HostTensor::from_tensor(y.clone()), &f["output.y"]);
    let grads = probe_loss(y, &f, &dev).backward();
    assert_input_grad(&x, &grads, &f);
    check_param_grads(&attn, &grads, with_prefix(&f, "grad."), 1);
}

#[test]
fn moe_matches_reference() {
    let f = fixture("moe");
    let dev = device();
    let cfg = ModelConfig {
        hidden_size: 16,
        num_experts: 6,
        num_experts_per_tok: 2,
        num_shared_experts: 1,
        moe_intermediate_size: 8,
        norm_topk_prob: true,
        ..ModelConfig::preset("tiny-dense").unwrap()
    };
    let moe = Moe::new(&cfg, &dev);
    let moe = assign_weights(moe, &moe_with_prefix(&f, "weight."), "moe").unwrap();
    let x = tensor::<3>(&f["input.x"], &dev).require_grad();
    let (y, stats) = moe.forward(x.clone());
    assert_close("y", &HostTensor::from_tensor(y.clone()), &f["output.y"]);
    assert_close(
        "load balance",
        &HostTensor::from_tensor(stats.load_balance.clone()),
        &f["output.load_balance"],
    );
    assert_close(
        "z loss",
        &HostTensor::from_tensor(stats.z_loss.clone()),
        &f["output.z_loss"],
    );
    let loss = probe_loss(y, &f, &dev) + stats.load_balance * 0.1 + stats.z_loss * 0.01;
    let grads = loss.backward();
    assert_input_grad(&x, &grads, &f);
    check_param_grads(&moe, &grads, moe_with_prefix(&f, "grad."), 1);
}

#[test]
fn whole_model_logits_loss_and_gradients_match_reference() {
    let f = fixture("model");
    let dev = device();
    let cfg = ModelConfig {
        vocab_size: 24,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_experts: 4,
        num_experts_per_tok: 2,
        num_shared_experts: 1,
        moe_intermediate_size: 16,
        first_k_dense_replace: 1,
        norm_head: true,
        tie_word_embeddings: false,
        ..ModelConfig::preset("tiny-dense").unwrap()
    };
    let model = nuwa_model::LanguageModel::uninitialised(&cfg, &dev);
    let model = assign_weights(model, &with_prefix(&f, "weight."), "model").unwrap();
    let ids = |name: &str| {
        let t = &f[name];
        let v: Vec<i64> = t.data.iter().map(|&x| x as i64).collect();
        Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(v, t.shape.clone()), &dev)
    };
    let out = model.forward(ids("output.tokens"), None);
    assert_close(
        "logits",
        &HostTensor::from_tensor(out.logits.clone()),
        &f["output.logits"],
    );
    let ce = nuwa_model::cross_entropy(out.logits, ids("output.targets"));
    assert_close(
        "cross-entropy",
        &HostTensor::from_tensor(ce.clone()),
        &f["output.ce"],
    );
    let stats = &out.router[0];
    let loss = ce + stats.load_balance.clone() * 0.015 + stats.z_loss.clone() * 1e-4;
    assert_close(
        "loss",
        &HostTensor::from_tensor(loss.clone()),
        &f["output.loss"],
    );
    let grads = loss.backward();
    check_param_grads(&model, &grads, with_prefix(&f, "grad."), 0);
}

/// Ling 2.0: sigmoid group-limited router with an expert bias (no gradient), QK-norm, half
/// RoPE and a multi-token-prediction layer — logits, losses and every gradient against the
/// reference.
#[test]
fn ling_2_model_logits_loss_and_gradients_match_reference() {
    let f = fixture("model_v2");
    let dev = device();
    let cfg = ModelConfig {
        vocab_size: 24,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_experts: 8,
        num_experts_per_tok: 3,
        num_shared_experts: 1,
        moe_intermediate_size: 16,
        first_k_dense_replace: 1,
        use_qk_norm: true,
        partial_rotary_factor: 0.5,
        score_function: nuwa_model::ScoreFunction::Sigmoid,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
        moe_router_enable_expert_bias: true,
        num_nextn_predict_layers: 1,
        mtp_loss_scaling_factor: 0.3,
        ..ModelConfig::preset("tiny-dense").unwrap()
    };
    let model = nuwa_model::LanguageModel::uninitialised(&cfg, &dev);
    let model = assign_weights(model, &with_prefix(&f, "weight."), "model_v2").unwrap();
    let ids = |name: &str| {
        let t = &f[name];
        let v: Vec<i64> = t.data.iter().map(|&x| x as i64).collect();
        Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(v, t.shape.clone()), &dev)
    };
    let (out, mtp_logits) = model.forward_train(ids("output.tokens"));
    assert_close(
        "logits",
        &HostTensor::from_tensor(out.logits.clone()),
        &f["output.logits"],
    );
    let targets = ids("output.targets");
    let ce = nuwa_model::cross_entropy(out.logits, targets.clone());
    assert_eq!(mtp_logits.len(), 1);
    let mtp = nuwa_model::cross_entropy(mtp_logits[0].clone(), targets.narrow(1, 1, 6));
    assert_close(
        "mtp loss",
        &HostTensor::from_tensor(mtp.clone()),
        &f["output.mtp"],
    );
    let stats = &out.router[0];
    let loss = ce
        + stats.load_balance.clone() * 0.015
        + stats.z_loss.clone() * 1e-4
        + mtp * model.mtp_loss_weight;
    assert_close(
        "loss",
        &HostTensor::from_tensor(loss.clone()),
        &f["output.loss"],
    );
    let grads = loss.backward();
    // Every weight but the expert bias, which has no gradient.
    let expected: BTreeMap<String, HostTensor> = with_prefix(&f, "grad.");
    check_param_grads(&model, &grads, expected, 0);
}

/// The routed experts' two execution paths — one batched matmul over padded groups, or one
/// expert at a time when routing is very uneven — compute what each expert computes alone.
#[test]
fn batched_and_per_expert_routing_agree() {
    let dev = base_device();
    let cfg = ModelConfig {
        hidden_size: 16,
        num_experts: 4,
        num_experts_per_tok: 2,
        moe_intermediate_size: 8,
        ..ModelConfig::preset("tiny-dense").unwrap()
    };
    let moe = nuwa_model::init::init_weights(Moe::new(&cfg, &dev), 3, 0.5);
    let x = Tensor::<2>::random([10, 16], burn::tensor::Distribution::Default, &dev);
    let balanced: Vec<Vec<i64>> = vec![vec![0, 3, 5], vec![1, 2], vec![4, 6, 9], vec![7, 8]];
    let skewed: Vec<Vec<i64>> = vec![(0..10).collect(), vec![], vec![2], vec![]];
    for tokens in [balanced, skewed] {
        let routed = HostTensor::from_tensor(moe.experts.forward_routed(x.clone(), &tokens));
        let one_by_one: Vec<Tensor<2>> = (0..4)
            .filter(|&e| !tokens[e].is_empty())
            .map(|e| {
                let rows = Tensor::<1, burn::tensor::Int>::from_data(
                    TensorData::new(tokens[e].clone(), [tokens[e].len()]),
                    &dev,
                );
                moe.experts.forward(e, x.clone().select(0, rows))
            })
            .collect();
        let expected = HostTensor::from_tensor(Tensor::cat(one_by_one, 0));
        assert_close("routed experts", &routed, &expected);
    }
}

/// Aux-loss-free balancing over five steps against the reference: each step's routing (with
/// the biases the previous steps moved) and the biases after it.
#[test]
fn aux_free_bias_updates_over_several_steps_match_reference() {
    let f = fixture("aux_free");
    let dev = base_device();
    let cfg = ModelConfig {
        hidden_size: 16,
        num_experts: 8,
        num_experts_per_tok: 3,
        moe_intermediate_size: 4,
        score_function: nuwa_model::ScoreFunction::Sigmoid,
        n_group: 4,
        topk_group: 2,
        moe_router_enable_expert_bias: true,
        ..ModelConfig::preset("tiny-dense").unwrap()
    };
    let moe = nuwa_model::init::init_weights(Moe::new(&cfg, &dev), 7, 0.02);
    let mut weights = nuwa_model::weights::collect_weights(&moe);
    weights.insert("gate.weight".into(), f["weight.gate.weight"].clone());
    let mut moe = assign_weights(moe, &weights, "aux_free").unwrap();
    for step in 0..5 {
        let x = tensor::<2>(&f[&format!("input.x{step}")], &dev);
        let (_, stats) = moe.forward_tokens(x);
        let load: Vec<f64> = stats.tokens_per_expert.iter().map(|&c| c as f64).collect();
        let want: Vec<f64> = f[&format!("output.load{step}")]
            .data
            .iter()
            .map(|&c| c as f64)
            .collect();
        assert_eq!(load, want, "step {step}: tokens per expert");
        let bias = moe.update_expert_bias(&load, 0.02).unwrap();
        let want = &f[&format!("output.bias{step}")].data;
        for (b, w) in bias.iter().zip(want) {
            assert!(
                (b - w).abs() < 1e-6,
                "step {step}: bias {bias:?} vs {want:?}"
            );
        }
    }
}
