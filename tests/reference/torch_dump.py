"""Writes a parity dump (the format of `nuwa parity`, crates/parity/src/dump.rs) from a
PyTorch/transformers run of a Hugging Face Llama checkpoint: the same batch as a nuwa dump,
forward activations module by module, the loss, and every parameter's gradient under nuwa's
names and layouts. Then `nuwa parity compare NUWA_DUMP TORCH_DUMP` says whether nuwa
computes what transformers computes, and where they first part.

    nuwa parity --hf tests/fixtures/hf/llama --devices cpu,cpu-reference --steps 1 \\
        --dump-dir /tmp/dumps --out /tmp/parity
    .venv-bench/bin/python tests/reference/torch_dump.py --hf tests/fixtures/hf/llama \\
        --batch-from /tmp/dumps/cpu --out /tmp/dumps/torch
    nuwa parity compare /tmp/dumps/cpu /tmp/dumps/torch --out /tmp/parity-torch

Only `llama` checkpoints: its modelling code ships with transformers, so this runs offline.
Op-level taps inside attention (query/key after RoPE, softmax(QKᵀ)V) have no module to hook
in transformers; the report lists them as recorded by nuwa only.
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file


def module_taps(model):
    """(module, nuwa name) pairs whose outputs are recorded, in forward order."""
    m = model.model
    taps = [(m.embed_tokens, "word_embeddings")]
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}"
        taps += [
            (layer.input_layernorm, f"{p}.input_layernorm"),
            (layer.self_attn, f"{p}.attention"),
            (layer.post_attention_layernorm, f"{p}.post_attention_layernorm"),
            (layer.mlp, f"{p}.mlp"),
            (layer, p),
        ]
    taps += [(m.norm, "norm"), (model.lm_head, "lm_head")]
    return taps


def nuwa_gradients(model):
    """Every gradient under nuwa's parameter names and layouts (crates/model/src/model.rs):
    linear weights are [in, out] (Burn's layout, the transpose of PyTorch's), and the query,
    key and value projections are one fused `query_key_value` (q, then k, then v)."""
    g = {n: p.grad.detach().numpy() for n, p in model.named_parameters() if p.grad is not None}
    out = {"word_embeddings.weight": g["model.embed_tokens.weight"]}
    for i in range(model.config.num_hidden_layers):
        hf, nw = f"model.layers.{i}", f"layers.{i}"
        qkv = np.concatenate([g[f"{hf}.self_attn.{x}_proj.weight"] for x in "qkv"], axis=0)
        out[f"{nw}.attention.query_key_value.weight"] = qkv.T
        out[f"{nw}.attention.dense.weight"] = g[f"{hf}.self_attn.o_proj.weight"].T
        for proj in ["gate_proj", "up_proj", "down_proj"]:
            out[f"{nw}.mlp.{proj}.weight"] = g[f"{hf}.mlp.{proj}.weight"].T
        for norm in ["input_layernorm", "post_attention_layernorm"]:
            out[f"{nw}.{norm}.weight"] = g[f"{hf}.{norm}.weight"]
    out["norm.weight"] = g["model.norm.weight"]
    if "lm_head.weight" in g and not model.config.tie_word_embeddings:
        out["lm_head.weight"] = g["lm_head.weight"].T
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True, help="a Hugging Face llama checkpoint folder")
    ap.add_argument("--batch-from", required=True, help="a nuwa dump: its batch is used")
    ap.add_argument("--out", required=True, help="the dump folder to write")
    args = ap.parse_args()

    with open(os.path.join(args.batch_from, "dump.json")) as f:
        batch = json.load(f)["batch"]
    b, t = batch["batch_size"], batch["seq_len"]
    inputs = torch.tensor(batch["inputs"], dtype=torch.long).reshape(b, t)
    targets = torch.tensor(batch["targets"], dtype=torch.long).reshape(b, t)

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.hf, torch_dtype=torch.float32, attn_implementation="eager")
    if model.config.model_type != "llama":
        raise SystemExit(f"{args.hf}: model_type {model.config.model_type!r}; this script "
                         "dumps llama checkpoints")
    model.train()  # dropout is 0 in these configs; train mode only keeps autograd honest

    recorded = []

    def hook(name):
        def record(_module, _inputs, output):
            value = output[0] if isinstance(output, tuple) else output
            recorded.append((name, value.detach().float().numpy().copy()))
        return record

    handles = [mod.register_forward_hook(hook(name)) for mod, name in module_taps(model)]
    logits = model(input_ids=inputs).logits
    for h in handles:
        h.remove()
    loss = torch.nn.functional.cross_entropy(logits.reshape(b * t, -1), targets.reshape(-1))
    loss.backward()

    tensors, entries = {}, []
    for name, value in recorded:
        tensors[f"forward/{name}"] = np.ascontiguousarray(value, dtype=np.float32)
        entries.append({"kind": "forward", "name": name})
    for name, grad in sorted(nuwa_gradients(model).items()):
        tensors[f"gradient/{name}"] = np.ascontiguousarray(grad, dtype=np.float32)
        entries.append({"kind": "gradient", "name": name})

    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "tensors.safetensors"))
    index = {
        "format": "nuwa-parity-dump/1",
        "source": f"transformers {transformers.__version__} (PyTorch {torch.__version__})",
        "step": 1,
        "loss": loss.item(),
        "batch": batch,
        "entries": entries,
    }
    with open(os.path.join(args.out, "dump.json"), "w") as f:
        json.dump(index, f, indent=1)
    print(f"wrote {args.out}: {len(entries)} tensors, loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
