"""nanoGPT's README CPU run against the same run in nuwa, side by side, in one run.

nanoGPT's README trains a baby character-level GPT on the CPU:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

This script runs exactly that, with nanoGPT's own `train.py` from a checkout you point it at
(nothing of nanoGPT is in this repository), on ../shared/data/tinyshakespeare.txt, and then
`nuwa train` on the same text with the same character vocabulary, context, batch, depth, width,
heads, learning-rate schedule and iterations. nuwa's model is its own architecture at nanoGPT's
size (the issue's terms): RMSNorm, RoPE, and a SwiGLU of width 344, whose three matrices hold
as many weights as nanoGPT's two-matrix GELU MLP of width 512 (3·128·344 ≈ 2·128·512). Both
get the same threads. It prints the median wall time per iteration of each and the ratio, and the final
validation losses, and writes bench/nanogpt_results.json.

    cargo build --release
    python3 bench/nanogpt_compare.py --nanogpt /path/to/nanoGPT [--iters 2000] [--threads 2]

The nanoGPT checkout needs numpy and torch in this Python (bench/setup.sh installs them).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUWA = os.path.join(ROOT, "target", "release", "nuwa")
TEXT = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

# nanoGPT's README CPU settings, as flags to its train.py.
README_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
                "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                "--dropout=0.0"]


def env_for(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                RAYON_NUM_THREADS=str(threads))


def run_nanogpt(checkout, work, iters, threads):
    """nanoGPT's train.py on the README config; per-iteration wall times and the last val loss."""
    repo = os.path.join(work, "nanoGPT")
    shutil.copytree(checkout, repo, ignore=shutil.ignore_patterns(".git", "out-*"))
    data = os.path.join(repo, "data", "shakespeare_char")
    shutil.copy(TEXT, os.path.join(data, "input.txt"))  # prepare.py downloads it otherwise
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *README_FLAGS,
           f"--max_iters={iters}", f"--lr_decay_iters={iters}"]
    run = subprocess.run(cmd, cwd=repo, env=env_for(threads), capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"nanoGPT failed:\n{run.stderr[-2000:]}")
    times = [float(m.group(1)) / 1000 for m in re.finditer(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", run.stdout)]
    vals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", run.stdout)
    return times, (float(vals[-1][2]) if vals else None)


def run_nuwa(work, iters, threads):
    """`nuwa train` on the same text and settings; per-step wall times and the last val loss."""
    data = os.path.join(work, "nuwa-data")
    subprocess.run([NUWA, "data", "prepare", "--input", TEXT, "--tokenizer", "char", "--out", data],
                   check=True, capture_output=True)
    vocab = json.load(open(os.path.join(data, "meta.json")))["vocab_size"] if os.path.exists(
        os.path.join(data, "meta.json")) else 65
    model = os.path.join(work, "model.toml")
    with open(model, "w") as f:
        f.write(f"vocab_size = {vocab}\nhidden_size = 128\nintermediate_size = 344\n"
                "num_hidden_layers = 4\nnum_attention_heads = 4\nnum_key_value_heads = 4\n"
                "max_position_embeddings = 64\nnum_experts = 0\ntie_word_embeddings = true\n")
    run_dir = os.path.join(work, "nuwa-run")
    # nanoGPT's schedule: lr 1e-3, 100 warm-up iterations, cosine to 1e-4; AdamW β2 0.99 is
    # nuwa's own default β2 0.95 (the optimiser's β's are not a flag).
    cmd = [NUWA, "train", "--model-config", model, "--data", data, "--run-dir", run_dir,
           "--seq-len", "64", "--batch-size", "12", "--steps", str(iters), "--lr", "1e-3",
           "--min-lr", "1e-4", "--warmup-steps", "100", "--dropout", "0", "--eval-every", "250",
           "--checkpoint-every", str(iters), "--sample-tokens", "0", "--quiet"]
    run = subprocess.run(cmd, env=env_for(threads), capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"nuwa failed:\n{run.stderr[-2000:]}")
    times, val = [], None
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if "step_seconds" in rec:
            times.append(rec["step_seconds"])
        if rec.get("val_loss") is not None:
            val = rec["val_loss"]
    return times, val


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nanogpt", required=True, help="a checkout of github.com/karpathy/nanoGPT")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each side, alternating; each side's fastest median counts")
    a = p.parse_args()
    if not os.path.exists(NUWA):
        sys.exit("build nuwa first: cargo build --release")
    if not os.path.exists(os.path.join(a.nanogpt, "train.py")):
        sys.exit(f"{a.nanogpt}: not a nanoGPT checkout (no train.py)")
    # The first iterations include start-up and the first evaluation on both sides.
    settle = lambda times: statistics.median(times[5:])  # noqa: E731
    t_runs, n_runs = [], []
    for r in range(max(1, a.repeats)):
        with tempfile.TemporaryDirectory() as work:
            theirs, their_val = run_nanogpt(a.nanogpt, work, a.iters, a.threads)
            ours, our_val = run_nuwa(work, a.iters, a.threads)
        t_runs.append(settle(theirs))
        n_runs.append(settle(ours))
        print(f"run {r + 1}: nanoGPT {1000 * t_runs[-1]:.1f} ms/iter, nuwa {1000 * n_runs[-1]:.1f} ms/iter",
              flush=True)
    t_med, n_med = min(t_runs), min(n_runs)
    report = {"iters": a.iters, "threads": a.threads, "repeats": a.repeats,
              "nanogpt_runs_median_iter_s": t_runs, "nuwa_runs_median_iter_s": n_runs,
              "nanogpt_median_iter_s": t_med, "nuwa_median_iter_s": n_med,
              "nuwa_over_nanogpt_time": n_med / t_med,
              "nanogpt_final_val_loss": their_val, "nuwa_final_val_loss": our_val}
    print(f"nanoGPT {1000 * t_med:.1f} ms/iter, nuwa {1000 * n_med:.1f} ms/iter: nuwa's time per "
          f"iteration is {n_med / t_med:.2f}x nanoGPT's; final val loss nanoGPT {their_val}, nuwa "
          f"{our_val}")
    with open(os.path.join(ROOT, "bench", "nanogpt_results.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_markdown(report)


def write_markdown(r):
    lines = [
        "# nanoGPT's README CPU run, side by side",
        "",
        "Generated by `bench/nanogpt_compare.py` — do not edit by hand. nanoGPT's own `train.py`",
        "with its README CPU settings (shakespeare_char, 4 layers, 4 heads, 128 wide, context 64,",
        f"batch 12, dropout 0, lr 1e-3 → 1e-4), {r['iters']} iterations, and `nuwa train` on the same",
        "text, characters, context, batch, depth, width, heads and schedule, at nanoGPT's size",
        "(SwiGLU width 344: the weights of nanoGPT's GELU MLP of width 512).",
        f"{r['threads']} threads on each side; median wall time per iteration (the loop, both sides), the",
        f"faster of {r['repeats']} alternating runs of each (all runs, ms: nanoGPT "
        f"{', '.join(f'{1000 * t:.1f}' for t in r['nanogpt_runs_median_iter_s'])}; nuwa "
        f"{', '.join(f'{1000 * t:.1f}' for t in r['nuwa_runs_median_iter_s'])}).",
        "",
        "| | nanoGPT | nuwa | nuwa ÷ nanoGPT |",
        "|---|---:|---:|---:|",
        f"| time per iteration | {1000 * r['nanogpt_median_iter_s']:.1f} ms | "
        f"{1000 * r['nuwa_median_iter_s']:.1f} ms | {r['nuwa_over_nanogpt_time']:.2f} |",
        f"| final validation loss | {r['nanogpt_final_val_loss']:.3f} | {r['nuwa_final_val_loss']:.3f} | |",
        "",
    ]
    with open(os.path.join(ROOT, "docs", "PERFORMANCE-nanogpt.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
