"""Independent PyTorch reference for nuwa's layers, and the generator of the test fixtures.

Written from the public definitions of the blocks (RMSNorm, rotary embeddings in the
"rotate half" convention, grouped-query causal attention, SwiGLU, a softmax top-k router with
dropless expert dispatch, the Switch load-balance loss and the router z-loss), not from nuwa's
code. Each fixture holds inputs, weights (keyed by nuwa's module paths, linear weights stored
as [in, out]), outputs, and gradients of `sum(output * probe)` (+ router losses for MoE).

Regenerate with:  python3 tests/reference/reference.py   (needs torch and safetensors)
"""

import math
import os

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
DT = torch.float64
OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def rand(*shape, scale=1.0):
    # Round through float32 so Rust sees exactly the values used here.
    return (torch.randn(*shape) * scale).float().to(DT)


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(theta, head_dim, start, length):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + length, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(DT), emb.sin().to(DT)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def attention(x, w, heads, kv_heads, head_dim, theta):
    b, t, _ = x.shape
    qkv = x @ w["query_key_value.weight"]
    if "query_key_value.bias" in w:
        qkv = qkv + w["query_key_value.bias"]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(b, t, heads, head_dim).transpose(1, 2)
    k = k.view(b, t, kv_heads, head_dim).transpose(1, 2)
    v = v.view(b, t, kv_heads, head_dim).transpose(1, 2)
    cos, sin = rope_tables(theta, head_dim, 0, t)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    groups = heads // kv_heads
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, t, heads * head_dim)
    return out @ w["dense.weight"]


def swiglu(x, w, prefix):
    gate = torch.nn.functional.silu(x @ w[f"{prefix}gate_proj.weight"])
    return (gate * (x @ w[f"{prefix}up_proj.weight"])) @ w[f"{prefix}down_proj.weight"]


def moe(x, w, num_experts, top_k, norm_topk, shared):
    b, t, h = x.shape
    tokens = x.reshape(b * t, h)
    logits = tokens @ w["gate.weight"]
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    if norm_topk and top_k > 1:  # Ant's gate renormalises only when top-k > 1
        top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(tokens)
    counts = []
    for e in range(num_experts):
        rows, slots = (top_i == e).nonzero(as_tuple=True)
        counts.append(len(rows))
        if len(rows) == 0:
            continue
        y = swiglu(tokens[rows], w, f"experts.{e}.") * top_w[rows, slots].unsqueeze(-1)
        out = out.index_add(0, rows, y)
    if shared:
        out = out + swiglu(tokens, w, "shared_experts.")
    fraction = torch.tensor(counts, dtype=DT) / (b * t * top_k)
    load_balance = num_experts * (fraction * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return out.reshape(b, t, h), load_balance, z_loss


def finish(name, inputs, weights, outputs, loss):
    leaves = {**inputs, **weights}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    tensors = {}
    for k, v in inputs.items():
        tensors[f"input.{k}"] = v
    for k, v in weights.items():
        tensors[f"weight.{k}"] = v
    for k, v in outputs.items():
        tensors[f"output.{k}"] = v
    for k, g in zip(leaves.keys(), grads):
        tensors[f"grad.{k}"] = g
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))
    print(f"wrote {name}: {len(tensors)} tensors")


def leaf(t):
    return t.clone().requires_grad_(True)


def make_rmsnorm():
    x = leaf(rand(2, 5, 16))
    w = {"weight": leaf(1.0 + rand(16, scale=0.1))}
    y = rms_norm(x, w["weight"], 1e-6)
    probe = rand(2, 5, 16)
    finish("rmsnorm", {"x": x}, w, {"y": y, "probe": probe}, (y * probe).sum())


def make_rope():
    x = leaf(rand(2, 3, 7, 8))
    cos, sin = rope_tables(10000.0, 8, 3, 7)
    y = apply_rope(x, cos, sin)
    probe = rand(2, 3, 7, 8)
    finish("rope", {"x": x}, {}, {"y": y, "probe": probe}, (y * probe).sum())


def make_attention():
    hidden, heads, kv_heads, head_dim = 32, 4, 2, 8
    x = leaf(rand(2, 6, hidden))
    qkv_out = (heads + 2 * kv_heads) * head_dim
    w = {
        "query_key_value.weight": leaf(rand(hidden, qkv_out, scale=0.2)),
        "query_key_value.bias": leaf(rand(qkv_out, scale=0.1)),
        "dense.weight": leaf(rand(heads * head_dim, hidden, scale=0.2)),
    }
    y = attention(x, w, heads, kv_heads, head_dim, 10000.0)
    probe = rand(2, 6, hidden)
    finish("attention", {"x": x}, w, {"y": y, "probe": probe}, (y * probe).sum())


def make_moe():
    hidden, experts, top_k, width = 16, 6, 2, 8
    x = leaf(rand(2, 5, hidden))
    w = {"gate.weight": leaf(rand(hidden, experts, scale=0.5))}
    for prefix in [f"experts.{e}." for e in range(experts)] + ["shared_experts."]:
        wide = width * (1 if prefix.startswith("experts") else 1)
        w[f"{prefix}gate_proj.weight"] = leaf(rand(hidden, wide, scale=0.3))
        w[f"{prefix}up_proj.weight"] = leaf(rand(hidden, wide, scale=0.3))
        w[f"{prefix}down_proj.weight"] = leaf(rand(wide, hidden, scale=0.3))
    y, lb, z = moe(x, w, experts, top_k, True, True)
    probe = rand(2, 5, hidden)
    loss = (y * probe).sum() + 0.1 * lb + 0.01 * z
    finish(
        "moe",
        {"x": x},
        w,
        {"y": y, "probe": probe, "load_balance": lb.reshape(1), "z_loss": z.reshape(1)},
        loss,
    )


def make_model():
    """A whole 2-layer model: layer 0 dense, layer 1 MoE; norm_head; untied head."""
    vocab, hidden, heads, kv_heads, head_dim, inter = 24, 32, 4, 2, 8, 48
    experts, top_k, width, eps, theta = 4, 2, 16, 1e-6, 10000.0
    w = {"word_embeddings.weight": leaf(rand(vocab, hidden, scale=0.5))}
    for layer in range(2):
        p = f"layers.{layer}."
        w[p + "input_layernorm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
        w[p + "post_attention_layernorm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
        w[p + "attention.query_key_value.weight"] = leaf(rand(hidden, (heads + 2 * kv_heads) * head_dim, scale=0.2))
        w[p + "attention.dense.weight"] = leaf(rand(heads * head_dim, hidden, scale=0.2))
        ffns = [(p + "mlp.Dense.", inter)] if layer == 0 else (
            [(p + f"mlp.Moe.experts.{e}.", width) for e in range(experts)] + [(p + "mlp.Moe.shared_experts.", width)]
        )
        if layer == 1:
            w[p + "mlp.Moe.gate.weight"] = leaf(rand(hidden, experts, scale=0.5))
        for prefix, wide in ffns:
            w[prefix + "gate_proj.weight"] = leaf(rand(hidden, wide, scale=0.2))
            w[prefix + "up_proj.weight"] = leaf(rand(hidden, wide, scale=0.2))
            w[prefix + "down_proj.weight"] = leaf(rand(wide, hidden, scale=0.2))
    w["norm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
    w["lm_head.weight"] = leaf(rand(hidden, vocab, scale=0.3))

    tokens = torch.randint(0, vocab, (2, 7))
    targets = torch.randint(0, vocab, (2, 7))
    x = w["word_embeddings.weight"][tokens]
    aux = []
    for layer in range(2):
        p = f"layers.{layer}."
        sub = {k[len(p + "attention."):]: v for k, v in w.items() if k.startswith(p + "attention.")}
        x = x + attention(rms_norm(x, w[p + "input_layernorm.weight"], eps), sub, heads, kv_heads, head_dim, theta)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        if layer == 0:
            x = x + swiglu(h, w, p + "mlp.Dense.")
        else:
            sub = {k[len(p + "mlp.Moe."):]: v for k, v in w.items() if k.startswith(p + "mlp.Moe.")}
            y, lb, z = moe(h, sub, experts, top_k, True, True)
            x = x + y
            aux.append((lb, z))
    x = rms_norm(x, w["norm.weight"], eps)
    # NormHead as Ant's modeling_bailing_moe.py: HF's lm_head.weight [vocab, hidden] divided by
    # (its L2 norm over dim 0 + 1e-7), the norm detached in training. Stored here as
    # [hidden, vocab], so the norm runs along dim 1: one per hidden index, across the vocabulary.
    head = w["lm_head.weight"]
    head = head / (head.norm(dim=1, keepdim=True) + 1e-7).detach()
    logits = x @ head
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    lb, z = aux[0]
    loss = ce + 0.015 * lb + 1e-4 * z
    finish(
        "model",
        {},
        w,
        {
            "logits": logits,
            "tokens": tokens.to(DT),
            "targets": targets.to(DT),
            "ce": ce.reshape(1),
            "loss": loss.reshape(1),
        },
        loss,
    )


if __name__ == "__main__":
    make_model()
    make_rmsnorm()
    make_rope()
    make_attention()
    make_moe()
