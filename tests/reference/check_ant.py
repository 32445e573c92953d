"""Checks Ling folders against Ant Group's own modelling code, the outside judge of nuwa's
`bailing_moe` semantics: each folder's config.json builds Ant's `BailingMoeForCausalLM`
(inclusionAI/Ling, `models/`), which loads the folder's weights strictly (a missing,
unexpected or mis-shaped tensor fails) and computes the prompt's logits and greedy tokens,
compared with the folder's `expected.safetensors` (written by hf_reference.py, or by a test
that exported a nuwa model). Ant's code is read from a checkout given on the command line;
nothing of it is kept in this project.

    pip install torch safetensors "transformers==4.51.3"
    git clone https://github.com/inclusionAI/Ling /tmp/Ling
    python3 tests/reference/check_ant.py --ling /tmp/Ling tests/fixtures/hf/bailing_moe*
"""

import argparse
import importlib.util
import json
import os
import sys

import torch
from safetensors.torch import load_file


def load_ant(models_dir):
    """Imports Ant's configuration and modelling files as one package."""
    spec = importlib.util.spec_from_file_location(
        "ant_ling", os.path.join(models_dir, "__init__.py"), submodule_search_locations=[models_dir])
    if not os.path.exists(os.path.join(models_dir, "__init__.py")):
        spec = importlib.util.spec_from_loader("ant_ling", loader=None, is_package=True)
        spec.submodule_search_locations = [models_dir]
    package = importlib.util.module_from_spec(spec)
    sys.modules["ant_ling"] = package
    config = importlib.import_module("ant_ling.configuration_bailing_moe")
    modeling = importlib.import_module("ant_ling.modeling_bailing_moe")
    return config.BailingMoeConfig, modeling.BailingMoeForCausalLM


def weights_of(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(os.path.join(folder, f)).items()})
    return out


def check(folder, Config, Model):
    cfg = json.load(open(os.path.join(folder, "config.json")))
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
    p.add_argument("--ling", required=True, help="a checkout of inclusionAI/Ling (its models/ folder is used)")
    p.add_argument("folders", nargs="+")
    a = p.parse_args()
    torch.manual_seed(0)
    Config, Model = load_ant(os.path.join(a.ling, "models"))
    ok = all([check(f, Config, Model) for f in a.folders])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
