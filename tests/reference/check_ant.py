"""Checks Ling folders against Ant Group's own modelling code, the outside judge of nuwa's
`bailing_moe` semantics: each folder's config.json builds Ant's `BailingMoeForCausalLM`
(inclusionAI/Ling, `models/`) or, for Ling 2.0, `BailingMoeV2ForCausalLM` (inclusionAI/Ling-V2), which loads the folder's weights strictly (a missing,
unexpected or mis-shaped tensor fails) and computes the prompt's logits and greedy tokens,
compared with the folder's `expected.safetensors` (written by hf_reference.py, or by a test
that exported a nuwa model). Ant's code is read from a checkout given on the command line;
nothing of it is kept in this project.

    pip install torch safetensors "transformers==4.51.3"
    git clone https://github.com/inclusionAI/Ling /tmp/Ling
    git clone https://github.com/inclusionAI/Ling-V2 /tmp/Ling-V2
    python3 tests/reference/check_ant.py --ling /tmp/Ling --ling-v2 /tmp/Ling-V2 tests/fixtures/hf/bailing_moe*
"""

import argparse
import importlib.util
import json
import os
import sys

import torch
from safetensors.torch import load_file


def load_ant(models_dir, package, suffix):
    """Imports Ant's configuration and modelling files (`*_bailing_moe{suffix}.py`) as one package."""
    spec = importlib.util.spec_from_loader(package, loader=None, is_package=True)
    spec.submodule_search_locations = [models_dir]
    sys.modules[package] = importlib.util.module_from_spec(spec)
    config = importlib.import_module(f"{package}.configuration_bailing_moe{suffix}")
    modeling = importlib.import_module(f"{package}.modeling_bailing_moe{suffix}")
    if suffix:
        return config.BailingMoeV2Config, modeling.BailingMoeV2ForCausalLM
    return config.BailingMoeConfig, modeling.BailingMoeForCausalLM


def weights_of(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(os.path.join(folder, f)).items()})
    return out


def check(folder, classes):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    v2 = (cfg.get("architectures") or [""])[0] == "BailingMoeV2ForCausalLM"
    if v2 not in classes:
        raise SystemExit(f"{folder}: a {'Ling 2.0' if v2 else 'Ling 1'} folder needs --ling{'-v2' if v2 else ''}")
    Config, Model = classes[v2]
    config = Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type")})
    config._attn_implementation = "eager"
    model = Model(config).float().eval()
    model.load_state_dict(weights_of(folder), strict=True)
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    ids = expected["input_ids"][None]
    with torch.no_grad():
        logits = model(ids).logits[0]
        tokens, cache = [], None
        out = model(ids, use_cache=True)
        for _ in range(len(expected["greedy"])):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    diff = (logits - expected["logits"]).abs().max().item()
    same = tokens == expected["greedy"].tolist()
    print(f"{folder}: max |Δ logits| vs Ant's code = {diff:.2e}, greedy tokens equal: {same}")
    return diff < 1e-4 and same


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ling", help="a checkout of inclusionAI/Ling (its models/ folder is used)")
    p.add_argument("--ling-v2", help="a checkout of inclusionAI/Ling-V2, for Ling 2.0 folders")
    p.add_argument("folders", nargs="+")
    a = p.parse_args()
    torch.manual_seed(0)
    classes = {}
    if a.ling:
        classes[False] = load_ant(os.path.join(a.ling, "models"), "ant_ling", "")
    if a.ling_v2:
        classes[True] = load_ant(os.path.join(a.ling_v2, "models"), "ant_ling_v2", "_v2")
    ok = all([check(f, classes) for f in a.folders])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
