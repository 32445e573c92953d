"""The PyTorch side of nuwa's benchmarks: the same model as nuwa (RMSNorm, RoPE, causal
attention, SwiGLU, dropless top-k MoE with a shared expert), fp32, eager, AdamW, on the same
shapes and batch, timed the same way (median of the timed steps after warm-up).

    python3 bench/torch_bench.py train --shape B --json
    python3 bench/torch_bench.py train --shape B --json --compile   # torch.compile (inductor)
"""

import argparse
import contextlib
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {
    # name: (vocab, layers, heads, hidden, ffn width, experts, top-k, shared, expert width, batch, ctx)
    "A": (65, 4, 4, 128, 512, 0, 0, 0, 0, 12, 64),
    "B": (8192, 6, 6, 384, 1536, 0, 0, 0, 0, 8, 256),
    "C": (8192, 6, 6, 384, 1536, 16, 2, 1, 256, 8, 256),
    "C-dense": (8192, 6, 6, 384, 768, 0, 0, 0, 0, 8, 256),
    "D": (8192, 6, 6, 384, 1536, 0, 0, 0, 0, 1, 256),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, start, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(start, start + x.shape[-2], dtype=torch.float32)
    emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads, self.d = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, cache=None):
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None or cache.get("k") is None else cache["k"].shape[2]
        q, k = rope(q, start), rope(k, start)
        if cache is not None:
            if cache.get("k") is not None:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        return self.out(y.transpose(1, 2).reshape(b, t, h))


class SwiGLU(nn.Module):
    def __init__(self, hidden, width):
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, hidden, experts, top_k, shared, width):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, width) for _ in range(experts))
        self.shared = SwiGLU(hidden, width * shared) if shared else None
        self.top_k = top_k
        self.aux = None

    def forward(self, x):
        b, t, h = x.shape
        x = x.reshape(-1, h)
        probs = F.softmax(self.router(x), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts))
        for e, expert in enumerate(self.experts):
            rows, slots = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                # (under bf16 autocast the expert's output is bf16; the sum stays in x's dtype)
                out.index_add_(0, rows, (expert(x[rows]) * w[rows, slots, None]).to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        frac = counts.float() / idx.numel()
        self.aux = len(self.experts) * (frac * probs.mean(0)).sum()
        return out.view(b, t, h)


class Block(nn.Module):
    def __init__(self, hidden, heads, width, moe):
        super().__init__()
        self.n1, self.n2 = RMSNorm(hidden), RMSNorm(hidden)
        self.attn = Attention(hidden, heads)
        self.ffn = moe if moe is not None else SwiGLU(hidden, width)

    def forward(self, x, cache=None):
        x = x + self.attn(self.n1(x), cache)
        return x + self.ffn(self.n2(x))


class Model(nn.Module):
    def __init__(self, vocab, layers, heads, hidden, width, experts, top_k, shared, ewidth):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        moe = lambda: MoE(hidden, experts, top_k, shared, ewidth) if experts else None
        self.blocks = nn.ModuleList(Block(hidden, heads, width, moe()) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, caches=None):
        x = self.emb(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.norm(x))

    def aux_loss(self):
        aux = [b.ffn.aux for b in self.blocks if isinstance(b.ffn, MoE)]
        return sum(aux) / len(aux) if aux else None


def build(shape):
    vocab, layers, heads, hidden, width, experts, top_k, shared, ewidth, batch, ctx = SHAPES[shape]
    torch.manual_seed(0)
    return Model(vocab, layers, heads, hidden, width, experts, top_k, shared, ewidth), vocab, batch, ctx


def bench_train(shape, warmup, steps, compile=False, bf16=False):
    model, vocab, batch, ctx = build(shape)
    if compile:
        # Inductor's CPU code generation (C++ with OpenMP); compiled in the first warm-up step.
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (batch, ctx + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    times, phases = [], [[], [], []]
    for i in range(warmup + steps):
        start = time.perf_counter()
        # bf16 autocast: linear layers and matmuls in bf16 (oneDNN), master weights f32.
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1))
            aux = model.aux_loss()
            if aux is not None:
                loss = loss + 0.01 * aux
        opt.zero_grad(set_to_none=True)
        forward_done = time.perf_counter() - start
        loss.backward()
        backward_done = time.perf_counter() - start
        opt.step()
        loss.item()
        total = time.perf_counter() - start
        if i >= warmup:
            times.append(total)
            for p, v in zip(phases, (forward_done, backward_done - forward_done, total - backward_done)):
                p.append(v)
    med = lambda v: sorted(v)[len(v) // 2]
    step = med(times)
    return {"tokens_per_s": batch * ctx / step, "median_step_s": step, "steps": steps,
            "phases": [med(p) for p in phases]}


@torch.inference_mode()
def bench_decode(shape, new_tokens, repeats):
    model, vocab, _, _ = build(shape)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        caches = [dict() for _ in model.blocks]
        logits = model(prompt, caches)
        produced = 0
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            produced += 1
            if produced == new_tokens:
                break
            logits = model(nxt, caches)
        if i > 0:
            times.append((time.perf_counter() - start) / new_tokens)
    per = sorted(times)[len(times) // 2]
    return {"tokens_per_s": 1.0 / per, "median_step_s": per, "steps": new_tokens}


def peak_rss_mib():
    """This process's peak resident memory (VmHWM), MiB; getrusage's maxrss would carry the
    parent's high-water mark across exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "decode"])
    p.add_argument("--shape", default="A", choices=sorted(SHAPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (training only)")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"],
                   help="bf16: train under torch.autocast(cpu, bfloat16)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "train":
        r = bench_train(a.shape, a.warmup, a.steps, a.compile, a.precision == "bf16")
    else:
        r = bench_decode(a.shape, a.new_tokens, a.steps)
    r.update(peak_rss_mib=peak_rss_mib(), shape=a.shape, kind=a.what, threads=torch.get_num_threads(), torch=torch.__version__,
             compiled=a.compile and a.what == "train", precision=a.precision)
    print(json.dumps(r) if a.json else f"{a.what} {a.shape}: {r['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()
