"""Independent PyTorch reference for the Hugging Face architectures nuwa imports and exports,
and the generator of the tiny checkpoints the Rust tests load (`tests/fixtures/hf/<arch>/`).

Written from the architectures' public descriptions (model cards, papers, config docs), not
from their modelling code: every one is a pre-norm decoder (RMSNorm, rotate-half RoPE,
grouped-query causal attention, SwiGLU) and they differ only in

  - tensor names (`embed_tokens` vs `word_embeddings`, split q/k/v vs fused `query_key_value`,
    Mixtral's `block_sparse_moe.experts.N.w1/w2/w3`),
  - biases (qwen2: q/k/v only; llama: `attention_bias` / `mlp_bias`),
  - qwen3_moe's per-head RMSNorm of queries and keys before RoPE,
  - the MoE: softmax router, top-k, top-k weights renormalised (mixtral always, the others when
    `norm_topk_prob`), Ling's shared experts and first dense layers, qwen3's `mlp_only_layers`,
  - Ling's NormHead: `lm_head.weight` `[vocab, hidden]` divided by (its L2 norm over dim 0
    + 1e-7), i.e. one norm per hidden index across the vocabulary (Ant's
    `modeling_bailing_moe.py`),
  - Ling's `use_bias` (the attention output projection only), its router (top-k weights
    renormalised only when top-k > 1), its zero-wide shared experts when
    `num_shared_experts = 0`, and the defaults of its config class for absent keys.

Each fixture folder holds `config.json`, the weights (`model.safetensors`, or shards with
`model.safetensors.index.json`; f32, bf16 or f16) and `expected.safetensors` with the prompt
`input_ids`, the fp32 `logits` of the prompt and `greedy` (32 tokens of greedy decoding).
Two fixtures (llama, bailing_moe_v2) carry a `tokenizer.json` and a `tokenizer_config.json`
with a chat template.

    python3 tests/reference/hf_reference.py            # regenerate tests/fixtures/hf
    python3 tests/reference/hf_reference.py --check DIR  # print max |Δ logits| of an HF folder vs this reference
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "hf")
GREEDY_TOKENS = 32


# ---------------------------------------------------------------------------------------------
# Configurations: one tiny config.json per architecture, written with each format's own keys.

def tiny_configs():
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    return {
        "llama": dict(common, model_type="llama", architectures=["LlamaForCausalLM"],
                      intermediate_size=64, rope_theta=10000.0, rope_scaling=None,
                      attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
        "qwen2": dict(common, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                      intermediate_size=64, rope_theta=1000000.0, use_sliding_window=False,
                      sliding_window=None, tie_word_embeddings=True, torch_dtype="bfloat16"),
        "qwen3_moe": dict(common, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                          intermediate_size=64, head_dim=16, rope_theta=1000000.0,
                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
                          attention_bias=False, tie_word_embeddings=False, router_aux_loss_coef=0.001),
        "mixtral": dict(common, model_type="mixtral", architectures=["MixtralForCausalLM"],
                        intermediate_size=48, rope_theta=1000000.0, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False,
                        torch_dtype="float16"),
        # Ling with Ant's defaults for every key left out (use_bias → a bias on the attention
        # output, rms_norm_eps 1e-5, rope_theta 1e4, norm_topk_prob), one expert per token (not
        # renormalised) and no shared experts (zero-wide tensors), NormHead.
        "bailing_moe_defaults": dict(model_type="bailing_moe", architectures=["BailingMoeForCausalLM"],
                                     vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                     num_experts=4, num_experts_per_tok=1, num_shared_experts=0,
                                     moe_intermediate_size=24, first_k_dense_replace=1, norm_head=True,
                                     pad_token_id=0, torch_dtype="float32"),
        # Ling 2.0: sigmoid router over 8 experts in 4 groups (2 chosen), top-3, expert bias,
        # scaling 2.5, QK-norm, half RoPE, head_dim 12, one shared expert, first layer dense,
        # one MTP layer (its weights are imported and exported; it does not change the logits).
        "bailing_moe_v2": dict(model_type="bailing_moe", architectures=["BailingMoeV2ForCausalLM"],
                               vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=12, intermediate_size=64, num_experts=8,
                               num_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                               moe_intermediate_size=16, first_k_dense_replace=1, routed_scaling_factor=2.5,
                               partial_rotary_factor=0.5, use_qk_norm=True, rope_theta=10000.0,
                               max_position_embeddings=128, num_nextn_predict_layers=1, pad_token_id=0,
                               eos_token_id=2, torch_dtype="float32"),
        "bailing_moe": dict(common, model_type="bailing_moe", architectures=["BailingMoeForCausalLM"],
                            intermediate_size=64, rope_theta=600000.0, num_experts=4,
                            num_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=24,
                            first_k_dense_replace=1, norm_topk_prob=True, norm_head=True,
                            use_bias=False, use_qkv_bias=False, tie_word_embeddings=False, pad_token_id=0),
    }


# `BailingMoeConfig`'s defaults for keys a config.json leaves out (Ant's configuration class).
BAILING_DEFAULTS = dict(vocab_size=30592, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        use_qkv_bias=False, use_bias=True, rms_norm_eps=1e-5, norm_head=False,
                        tie_word_embeddings=False, max_position_embeddings=16384, rope_theta=10000.0,
                        num_experts=16, num_shared_experts=0, num_experts_per_tok=2, norm_topk_prob=True,
                        first_k_dense_replace=0)


# `BailingMoeV2Config`'s defaults (Ling 2.0, told apart from Ling 1 by its `architectures`).
BAILING_V2_DEFAULTS = dict(vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20,
                           num_attention_heads=16, num_key_value_heads=4, use_qkv_bias=False, use_bias=False,
                           rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768,
                           rope_theta=600000.0, num_experts=256, num_shared_experts=1, num_experts_per_tok=8,
                           n_group=8, topk_group=4, moe_intermediate_size=512, first_k_dense_replace=1,
                           head_dim=128, use_qk_norm=True, routed_scaling_factor=1.0, partial_rotary_factor=1.0)


def is_v2(cfg):
    return (cfg.get("architectures") or [""])[0] == "BailingMoeV2ForCausalLM"


def get(cfg, key, default=None):
    if cfg.get("model_type") == "bailing_moe" and cfg.get(key) is None:
        defaults = BAILING_V2_DEFAULTS if is_v2(cfg) else BAILING_DEFAULTS
        if key in defaults:
            return defaults[key]
    value = cfg.get(key, default)
    return default if value is None else value


def head_dim(cfg):
    return get(cfg, "head_dim", get(cfg, "hidden_size") // get(cfg, "num_attention_heads"))


def rope_theta(cfg):
    params = cfg.get("rope_parameters") or {}
    return float(get(cfg, "rope_theta", params.get("rope_theta", 10000.0)))


def is_moe_layer(cfg, i):
    t = cfg["model_type"]
    if t == "mixtral":
        return True
    if t == "qwen3_moe":
        step = get(cfg, "decoder_sparse_step", 1)
        return get(cfg, "num_experts") > 0 and i not in get(cfg, "mlp_only_layers", []) and (i + 1) % step == 0
    if t == "bailing_moe":  # (and every MTP layer, which comes after the last)
        return get(cfg, "num_experts", 0) > 0 and i >= get(cfg, "first_k_dense_replace", 0)
    return False


def num_experts(cfg):
    return get(cfg, "num_local_experts") if cfg["model_type"] == "mixtral" else get(cfg, "num_experts")


# ---------------------------------------------------------------------------------------------
# Tensor names and shapes, per architecture ([out, in] for every linear weight).

def layer_tensors(cfg, i):
    t, h = cfg["model_type"], get(cfg, "hidden_size")
    d, nh, kv = head_dim(cfg), get(cfg, "num_attention_heads"), get(cfg, "num_key_value_heads")
    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    if t == "bailing_moe":
        out[p + "attention.query_key_value.weight"] = [(nh + 2 * kv) * d, h]
        if get(cfg, "use_qkv_bias", False):
            out[p + "attention.query_key_value.bias"] = [(nh + 2 * kv) * d]
        out[p + "attention.dense.weight"] = [h, nh * d]
        if get(cfg, "use_bias", False):
            out[p + "attention.dense.bias"] = [h]
        if is_v2(cfg) and get(cfg, "use_qk_norm"):
            out[p + "attention.query_layernorm.weight"] = [d]
            out[p + "attention.key_layernorm.weight"] = [d]
    else:
        qkv_bias = t == "qwen2" or get(cfg, "attention_bias", False)
        for name, rows in (("q_proj", nh * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            out[p + f"self_attn.{name}.weight"] = [rows, h]
            if qkv_bias:
                out[p + f"self_attn.{name}.bias"] = [rows]
        out[p + "self_attn.o_proj.weight"] = [h, nh * d]
        if t == "llama" and get(cfg, "attention_bias", False):
            out[p + "self_attn.o_proj.bias"] = [h]
        if t == "qwen3_moe":
            out[p + "self_attn.q_norm.weight"] = [d]
            out[p + "self_attn.k_norm.weight"] = [d]

    def swiglu(prefix, width, names=("gate_proj", "up_proj", "down_proj")):
        out[prefix + names[0] + ".weight"] = [width, h]
        out[prefix + names[1] + ".weight"] = [width, h]
        out[prefix + names[2] + ".weight"] = [h, width]

    if not is_moe_layer(cfg, i):
        swiglu(p + "mlp.", get(cfg, "intermediate_size"))
    elif t == "mixtral":
        out[p + "block_sparse_moe.gate.weight"] = [num_experts(cfg), h]
        for e in range(num_experts(cfg)):
            swiglu(p + f"block_sparse_moe.experts.{e}.", get(cfg, "intermediate_size"), ("w1", "w3", "w2"))
    else:
        out[p + "mlp.gate.weight"] = [num_experts(cfg), h]
        if is_v2(cfg):  # a buffer every Ling 2.0 checkpoint carries
            out[p + "mlp.gate.expert_bias"] = [num_experts(cfg)]
        for e in range(num_experts(cfg)):
            swiglu(p + f"mlp.experts.{e}.", get(cfg, "moe_intermediate_size"))
        if t == "bailing_moe":  # built even with 0 shared experts: then zero wide
            swiglu(p + "mlp.shared_experts.", get(cfg, "moe_intermediate_size") * get(cfg, "num_shared_experts"))
    return out


def all_tensors(cfg):
    h, v = get(cfg, "hidden_size"), get(cfg, "vocab_size")
    emb = "model.word_embeddings.weight" if cfg["model_type"] == "bailing_moe" else "model.embed_tokens.weight"
    out = {emb: [v, h]}
    for i in range(get(cfg, "num_hidden_layers")):
        out.update(layer_tensors(cfg, i))
    if is_v2(cfg):  # multi-token-prediction layers follow as MoE decoder layers with extras
        for i in range(get(cfg, "num_hidden_layers"), get(cfg, "num_hidden_layers") + get(cfg, "num_nextn_predict_layers", 0)):
            out.update(layer_tensors(cfg, i))
            p = f"model.layers.{i}."
            out.update({p + "enorm.weight": [h], p + "hnorm.weight": [h], p + "eh_proj.weight": [h, 2 * h],
                        p + "final_layernorm.weight": [h]})
    out["model.norm.weight"] = [h]
    if not get(cfg, "tie_word_embeddings", False):
        out["lm_head.weight"] = [v, h]
    return out


def random_weights(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in all_tensors(cfg).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            weights[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            weights[name] = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    return weights


# ---------------------------------------------------------------------------------------------
# The forward pass, from the descriptions above; everything in fp32.

def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, start, theta, rotary=None):
    """Rotate-half RoPE on the first `rotary` features of each head (all by default)."""
    if rotary is not None and rotary < x.shape[-1]:
        return torch.cat([rope(x[..., :rotary], start, theta), x[..., rotary:]], -1)
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(start, start + x.shape[-2], dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def attention(cfg, W, p, x, cache):
    t = cfg["model_type"]
    b, n, _ = x.shape
    d, nh, kv = head_dim(cfg), get(cfg, "num_attention_heads"), get(cfg, "num_key_value_heads")
    if t == "bailing_moe":
        qkv = linear(x, W[p + "attention.query_key_value.weight"], W.get(p + "attention.query_key_value.bias"))
        q, k, v = qkv.split([nh * d, kv * d, kv * d], -1)
        out_w, out_b = W[p + "attention.dense.weight"], W.get(p + "attention.dense.bias")
    else:
        q, k, v = (linear(x, W[p + f"self_attn.{s}_proj.weight"], W.get(p + f"self_attn.{s}_proj.bias"))
                   for s in "qkv")
        out_w, out_b = W[p + "self_attn.o_proj.weight"], W.get(p + "self_attn.o_proj.bias")
    q = q.view(b, n, nh, d).transpose(1, 2)
    k = k.view(b, n, kv, d).transpose(1, 2)
    v = v.view(b, n, kv, d).transpose(1, 2)
    if t == "qwen3_moe":
        q = rms_norm(q, W[p + "self_attn.q_norm.weight"], get(cfg, "rms_norm_eps"))
        k = rms_norm(k, W[p + "self_attn.k_norm.weight"], get(cfg, "rms_norm_eps"))
    start = 0 if cache.get(p) is None else cache[p][0].shape[2]
    if is_v2(cfg) and get(cfg, "use_qk_norm"):
        q = rms_norm(q, W[p + "attention.query_layernorm.weight"], get(cfg, "rms_norm_eps"))
        k = rms_norm(k, W[p + "attention.key_layernorm.weight"], get(cfg, "rms_norm_eps"))
    rotary = int(d * get(cfg, "partial_rotary_factor", 1.0))
    q, k = rope(q, start, rope_theta(cfg), rotary), rope(k, start, rope_theta(cfg), rotary)
    if cache.get(p) is not None:
        k = torch.cat([cache[p][0], k], 2)
        v = torch.cat([cache[p][1], v], 2)
    cache[p] = (k, v)
    k = k.repeat_interleave(nh // kv, dim=1)
    v = v.repeat_interleave(nh // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    total = k.shape[2]
    mask = torch.ones(n, total, dtype=torch.bool).tril(total - n)
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v
    return linear(y.transpose(1, 2).reshape(b, n, nh * d), out_w, out_b)


def swiglu(W, prefix, x, names=("gate_proj", "up_proj", "down_proj")):
    gate = linear(x, W[prefix + names[0] + ".weight"], W.get(prefix + names[0] + ".bias"))
    up = linear(x, W[prefix + names[1] + ".weight"], W.get(prefix + names[1] + ".bias"))
    return linear(torch.nn.functional.silu(gate) * up, W[prefix + names[2] + ".weight"],
                  W.get(prefix + names[2] + ".bias"))


def moe(cfg, W, p, x):
    t = cfg["model_type"]
    base = p + ("block_sparse_moe." if t == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if t == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    flat = x.reshape(-1, x.shape[-1])
    if is_v2(cfg):
        weight, expert = v2_route(cfg, linear(flat, W[base + "gate.weight"]), W[base + "gate.expert_bias"])
        return experts_and_shared(cfg, W, base, names, flat, weight, expert).view_as(x)
    probs = linear(flat, W[base + "gate.weight"]).softmax(-1)
    weight, expert = probs.topk(get(cfg, "num_experts_per_tok"), -1)
    k = get(cfg, "num_experts_per_tok")
    if t == "mixtral" or (get(cfg, "norm_topk_prob", False) and (t != "bailing_moe" or k > 1)):
        weight = weight / weight.sum(-1, keepdim=True)
    return experts_and_shared(cfg, W, base, names, flat, weight, expert).view_as(x)


def v2_route(cfg, logits, bias):
    """Ling 2.0's router: sigmoid scores; experts chosen on score + bias among the `topk_group`
    best of `n_group` groups (a group scores the sum of its two best); weighted by the unbiased
    scores, renormalised when top-k > 1, times `routed_scaling_factor`."""
    k, groups, keep = get(cfg, "num_experts_per_tok"), get(cfg, "n_group"), get(cfg, "topk_group")
    scores = torch.sigmoid(logits)
    routing = scores + bias
    n, e = routing.shape
    if groups > 1:
        per_group = routing.view(n, groups, e // groups)
        group_score = per_group.topk(2, -1).values.sum(-1)
        best = group_score.topk(keep, -1).indices
        allowed = torch.zeros(n, groups, dtype=torch.bool).scatter(1, best, True)
        routing = routing.masked_fill(~allowed.repeat_interleave(e // groups, 1), float("-inf"))
    expert = routing.topk(k, -1).indices
    weight = scores.gather(1, expert)
    if k > 1:
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    return weight * get(cfg, "routed_scaling_factor"), expert


def experts_and_shared(cfg, W, base, names, flat, weight, expert):
    out = torch.zeros_like(flat)
    for e in range(num_experts(cfg)):
        rows, slots = (expert == e).nonzero(as_tuple=True)
        if len(rows):
            y = swiglu(W, base + f"experts.{e}.", flat[rows], names)
            out.index_add_(0, rows, y * weight[rows, slots, None])
    if cfg["model_type"] == "bailing_moe" and get(cfg, "num_shared_experts", 0):
        out = out + swiglu(W, base + "shared_experts.", flat)
    return out


def forward(cfg, W, ids, cache):
    emb = W["model.word_embeddings.weight"] if cfg["model_type"] == "bailing_moe" else W["model.embed_tokens.weight"]
    x = emb[ids]
    eps = get(cfg, "rms_norm_eps")
    for i in range(get(cfg, "num_hidden_layers")):
        p = f"model.layers.{i}."
        x = x + attention(cfg, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps), cache)
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        x = x + (moe(cfg, W, p, h) if is_moe_layer(cfg, i) else swiglu(W, p + "mlp.", h))
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", emb) if not get(cfg, "tie_word_embeddings", False) else emb
    if get(cfg, "norm_head", False) and not is_v2(cfg):
        head = head / (head.norm(dim=0, keepdim=True) + 1e-7)
    return x @ head.T


def greedy(cfg, W, prompt, steps):
    cache = {}
    logits = forward(cfg, W, prompt[None], cache)[0, -1]
    out = []
    for _ in range(steps):
        nxt = int(logits.argmax())
        out.append(nxt)
        logits = forward(cfg, W, torch.tensor([[nxt]]), cache)[0, -1]
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_weights(folder, weights, dtype, shards):
    stored = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    if shards == 1:
        save_file(stored, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(stored)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: stored[k] for k in part}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())},
             "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def tiny_tokenizer(folder):
    """A word-level tokenizer over the fixture vocabulary, plus a ChatML-style chat template."""
    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    words += [f"w{i}" for i in range(96 - len(words))]
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, w in enumerate(words[:5])],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"},
    }
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tok, f, indent=1)
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}, f, indent=1)


def make_fixture(name, cfg, seed, shards=1):
    folder = os.path.join(OUT, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    weights = random_weights(cfg, seed)
    dtype = DTYPES[cfg.get("torch_dtype", "float32")]
    # The reference computes from the stored values, so bf16/f16 fixtures test the upcast.
    weights = {k: v.to(dtype).float() for k, v in weights.items()}
    save_weights(folder, weights, dtype, shards)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, get(cfg, "vocab_size"), (12,), generator=g)
    with torch.no_grad():
        logits = forward(cfg, weights, ids[None], {})[0]
        tokens = greedy(cfg, weights, ids, GREEDY_TOKENS)
    save_file({"input_ids": ids.to(torch.int64), "logits": logits.contiguous(),
               "greedy": torch.tensor(tokens, dtype=torch.int64)},
              os.path.join(folder, "expected.safetensors"))
    return folder


def load_folder(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for file in files:
        weights.update({k: v.float() for k, v in load_file(os.path.join(folder, file)).items()})
    return cfg, weights


def check(folder):
    """Compares an HF folder (e.g. one nuwa exported) with the expected logits beside it."""
    cfg, weights = load_folder(folder)
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    with torch.no_grad():
        logits = forward(cfg, weights, expected["input_ids"][None], {})[0]
    print(f"{folder}: max |Δ logits| = {(logits - expected['logits']).abs().max():.3e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check", help="an HF folder with an expected.safetensors to compare against")
    a = p.parse_args()
    if a.check:
        check(a.check)
        return
    configs = tiny_configs()
    for seed, (name, cfg) in enumerate(configs.items()):
        folder = make_fixture(name, cfg, 100 + seed, shards=2 if name == "qwen3_moe" else 1)
        if name in ("llama", "bailing_moe_v2"):
            tiny_tokenizer(folder)
        print("wrote", folder)


if __name__ == "__main__":
    sys.exit(main())
