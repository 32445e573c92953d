"""Checks the fixtures (and so this project's reference) against the `transformers` library:
each HF fixture folder is loaded with AutoModelForCausalLM and its logits compared with the
expected ones; bailing_moe is not part of transformers and is skipped. Also usable on a
folder nuwa exported: `python3 tests/reference/check_transformers.py DIR [DIR...]`.

    pip install transformers   # with torch
    python3 tests/reference/check_transformers.py
"""

import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(folder):
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(expected["input_ids"][None]).logits[0]
        greedy = model.generate(expected["input_ids"][None], max_new_tokens=len(expected["greedy"]),
                                do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(expected["input_ids"]):]
    diff = (logits - expected["logits"]).abs().max().item()
    same = greedy.tolist() == expected["greedy"].tolist()
    print(f"{folder}: max |Δ logits| = {diff:.2e}, greedy tokens equal: {same}")
    return diff < 1e-4 and same


def main():
    folders = sys.argv[1:] or [os.path.join(ROOT, "fixtures", "hf", a)
                                for a in ("llama", "qwen2", "qwen3_moe", "mixtral")]
    ok = all([check(f) for f in folders])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
