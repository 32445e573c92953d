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


def finish(name, inputs, weights, outputs, loss, buffers=None):
    """Saves inputs, weights (and `buffers`: weights without a gradient), outputs and the
    gradient of `loss` with respect to every input and weight."""
    leaves = {**inputs, **weights}
    # A routed expert no token chose has a zero gradient.
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads)]
    tensors = {}
    for k, v in inputs.items():
        tensors[f"input.{k}"] = v
    for k, v in {**weights, **(buffers or {})}.items():
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


def attention_v2(x, w, heads, kv_heads, head_dim, theta, rotary, eps):
    """Ling 2.0 attention: per-head RMSNorm of queries and keys, RoPE on the first `rotary`
    features of each head only."""
    b, t, _ = x.shape
    q, k, v = (x @ w["query_key_value.weight"]).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = rms_norm(q.view(b, t, heads, head_dim).transpose(1, 2), w["query_layernorm.weight"], eps)
    k = rms_norm(k.view(b, t, kv_heads, head_dim).transpose(1, 2), w["key_layernorm.weight"], eps)
    v = v.view(b, t, kv_heads, head_dim).transpose(1, 2)
    cos, sin = rope_tables(theta, rotary, 0, t)
    turn = lambda z: torch.cat([apply_rope(z[..., :rotary], cos, sin), z[..., rotary:]], dim=-1)
    q, k = turn(q), turn(k)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, heads * head_dim)
    return out @ w["dense.weight"]


def moe_v2(x, w, bias, experts, top_k, groups, topk_groups, scaling):
    """Ling 2.0's router: sigmoid scores; experts chosen (no gradient) on score + bias among
    the `topk_groups` best groups (a group scores its two best); weights from the unbiased
    scores, renormalised, times `scaling`. The balance statistics use each token's scores
    normalised to sum 1 as its probabilities."""
    b, t, h = x.shape
    tokens = x.reshape(b * t, h)
    logits = tokens @ w["gate.weight"]
    scores = torch.sigmoid(logits)
    routing = scores.detach() + bias
    n = routing.shape[0]
    group_score = routing.view(n, groups, -1).topk(2, dim=-1).values.sum(-1)
    best = group_score.topk(topk_groups, dim=-1).indices
    allowed = torch.zeros(n, groups, dtype=torch.bool).scatter(1, best, True)
    routing = routing.masked_fill(~allowed.repeat_interleave(experts // groups, 1), float("-inf"))
    top_i = routing.topk(top_k, dim=-1).indices
    top_w = scores.gather(1, top_i)
    top_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20) * scaling
    out = torch.zeros_like(tokens)
    counts = []
    for e in range(experts):
        rows, slots = (top_i == e).nonzero(as_tuple=True)
        counts.append(len(rows))
        if len(rows):
            y = swiglu(tokens[rows], w, f"experts.{e}.") * top_w[rows, slots].unsqueeze(-1)
            out = out.index_add(0, rows, y)
    out = out + swiglu(tokens, w, "shared_experts.")
    probs = scores / scores.sum(-1, keepdim=True)
    fraction = torch.tensor(counts, dtype=DT) / (n * top_k)
    load_balance = experts * (fraction * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return out.reshape(b, t, h), load_balance, z_loss


def v2_layer_weights(w, p, hidden, heads, kv_heads, head_dim, experts, width, moe):
    """One Ling 2.0 decoder layer's weights under `p` (format-1 names: `mlp.Dense.`/`mlp.Moe.`)."""
    w[p + "input_layernorm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
    w[p + "post_attention_layernorm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
    w[p + "attention.query_key_value.weight"] = leaf(rand(hidden, (heads + 2 * kv_heads) * head_dim, scale=0.2))
    w[p + "attention.dense.weight"] = leaf(rand(heads * head_dim, hidden, scale=0.2))
    w[p + "attention.query_layernorm.weight"] = leaf(1.0 + rand(head_dim, scale=0.1))
    w[p + "attention.key_layernorm.weight"] = leaf(1.0 + rand(head_dim, scale=0.1))
    ffns = [(p + "mlp.Dense.", 48)] if not moe else (
        [(p + f"mlp.Moe.experts.{e}.", width) for e in range(experts)] + [(p + "mlp.Moe.shared_experts.", width)])
    if moe:
        w[p + "mlp.Moe.gate.weight"] = leaf(rand(hidden, experts, scale=0.5))
    for prefix, wide in ffns:
        w[prefix + "gate_proj.weight"] = leaf(rand(hidden, wide, scale=0.2))
        w[prefix + "up_proj.weight"] = leaf(rand(hidden, wide, scale=0.2))
        w[prefix + "down_proj.weight"] = leaf(rand(wide, hidden, scale=0.2))


def make_model_v2():
    """A whole Ling 2.0-style model: layer 0 dense, layer 1 MoE with the sigmoid group-limited
    router (8 experts in 4 groups, 2 chosen, top-3, expert bias, scaling 2.5), QK-norm, half
    RoPE, no NormHead, and one multi-token-prediction layer whose loss joins with weight 0.3."""
    vocab, hidden, heads, kv_heads, head_dim = 24, 32, 4, 2, 8
    experts, top_k, width, eps, theta = 8, 3, 16, 1e-6, 10000.0
    w = {"word_embeddings.weight": leaf(rand(vocab, hidden, scale=0.5))}
    for layer in range(2):
        v2_layer_weights(w, f"layers.{layer}.", hidden, heads, kv_heads, head_dim, experts, width, layer == 1)
    w["norm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
    w["lm_head.weight"] = leaf(rand(hidden, vocab, scale=0.3))
    m = "mtp_layers.0."
    w[m + "enorm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
    w[m + "hnorm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
    w[m + "eh_proj.weight"] = leaf(rand(2 * hidden, hidden, scale=0.2))
    v2_layer_weights(w, m + "decoder.", hidden, heads, kv_heads, head_dim, experts, width, True)
    w[m + "final_layernorm.weight"] = leaf(1.0 + rand(hidden, scale=0.1))
    biases = {"layers.1.mlp.Moe.expert_bias": rand(experts, scale=0.05),
              m + "decoder.mlp.Moe.expert_bias": rand(experts, scale=0.05)}

    def layer(x, p, bias):
        sub = {k[len(p + "attention."):]: v for k, v in w.items() if k.startswith(p + "attention.")}
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        x = x + attention_v2(h, sub, heads, kv_heads, head_dim, theta, head_dim // 2, eps)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        if bias is None:
            return x + swiglu(h, w, p + "mlp.Dense."), None, None
        sub = {k[len(p + "mlp.Moe."):]: v for k, v in w.items() if k.startswith(p + "mlp.Moe.")}
        y, lb, z = moe_v2(h, sub, bias, experts, top_k, 4, 2, 2.5)
        return x + y, lb, z

    tokens = torch.randint(0, vocab, (2, 7))
    targets = torch.randint(0, vocab, (2, 7))
    x = w["word_embeddings.weight"][tokens]
    x, _, _ = layer(x, "layers.0.", None)
    x, lb, z = layer(x, "layers.1.", biases["layers.1.mlp.Moe.expert_bias"])
    hidden_states = rms_norm(x, w["norm.weight"], eps)
    logits = hidden_states @ w["lm_head.weight"]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    # MTP depth 1: position t reads token t + 1 (token 0 past the end) and predicts target t + 1.
    ahead = torch.cat([tokens[:, 1:], torch.zeros(2, 1, dtype=tokens.dtype)], dim=1)
    e = rms_norm(w["word_embeddings.weight"][ahead], w[m + "enorm.weight"], eps)
    h = rms_norm(hidden_states, w[m + "hnorm.weight"], eps)
    h = torch.cat([e, h], dim=-1) @ w[m + "eh_proj.weight"]
    h, _, _ = layer(h, m + "decoder.", biases[m + "decoder.mlp.Moe.expert_bias"])
    h = rms_norm(h, w[m + "final_layernorm.weight"], eps)
    mtp_logits = h[:, :-1] @ w["lm_head.weight"]
    mtp = torch.nn.functional.cross_entropy(mtp_logits.reshape(-1, vocab), targets[:, 1:].reshape(-1))
    loss = ce + 0.015 * lb + 1e-4 * z + 0.3 * mtp
    finish(
        "model_v2",
        {},
        w,
        {"logits": logits, "tokens": tokens.to(DT), "targets": targets.to(DT),
         "ce": ce.reshape(1), "mtp": mtp.reshape(1), "loss": loss.reshape(1)},
        loss,
        buffers=biases,
    )


def make_aux_free():
    """Aux-loss-free balancing over several steps: a Ling 2.0 router (8 experts in 4 groups, 2
    chosen, top-3) routes five batches in turn; after each, every expert's bias moves by
    `rate` · sign(mean load − its load) (DeepSeek-V3's rule, as Megatron applies it), and the
    next batch is routed with the moved biases. Saves the batches, each step's tokens per
    expert and the biases after each step."""
    hidden, experts, top_k, groups, keep, rate = 16, 8, 3, 4, 2, 0.02
    gate = rand(hidden, experts, scale=0.5)
    bias = torch.zeros(experts, dtype=DT)
    tensors = {"weight.gate.weight": gate}
    for step in range(5):
        x = rand(40, hidden)
        scores = torch.sigmoid(x @ gate)
        routing = scores + bias
        group_score = routing.view(40, groups, -1).topk(2, dim=-1).values.sum(-1)
        best = group_score.topk(keep, dim=-1).indices
        allowed = torch.zeros(40, groups, dtype=torch.bool).scatter(1, best, True)
        routing = routing.masked_fill(~allowed.repeat_interleave(experts // groups, 1), float("-inf"))
        chosen = routing.topk(top_k, dim=-1).indices
        load = torch.bincount(chosen.flatten(), minlength=experts).to(DT)
        bias = bias + rate * torch.sign(load.mean() - load)
        tensors[f"input.x{step}"] = x
        tensors[f"output.load{step}"] = load
        tensors[f"output.bias{step}"] = bias.clone()
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "aux_free.safetensors"))
    print(f"wrote aux_free: {len(tensors)} tensors")


if __name__ == "__main__":
    make_model()
    make_rmsnorm()
    make_rope()
    make_attention()
    make_moe()
    make_model_v2()
    make_aux_free()
