"""How long a checkpoint holds training up: the same run with checkpoints written before the
next step (--sync-checkpoints, the old path) and in the background (the default), side by
side. Each checkpoint step records `checkpoint_blocked_seconds` in metrics.jsonl; this prints
their median, the ratio, the whole run's wall time, and writes docs/CHECKPOINTS.md
(regenerated, never edited by hand) and bench/checkpoint_results.json.

    cargo build --release
    python3 bench/checkpoint_bench.py [--hidden 512] [--layers 8] [--steps 12]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUWA = os.path.join(ROOT, "target", "release", "nuwa")


def run(mode, args, run_dir):
    cmd = [NUWA, "train", "--preset", "tiny-dense", "--hidden-size", str(args.hidden),
           "--layers", str(args.layers), "--batch-size", "2", "--seq-len", "64",
           "--steps", str(args.steps), "--checkpoint-every", str(args.every),
           "--eval-every", "100000", "--quiet", "--sample-tokens", "0", "--run-dir", run_dir]
    if mode == "synchronous":
        cmd.append("--sync-checkpoints")
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"nuwa train ({mode}) failed: {done.stderr.strip()}")
    records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    blocked = [r["checkpoint_blocked_seconds"] for r in records if "checkpoint_blocked_seconds" in r]
    size = sum(os.path.getsize(os.path.join(dp, f))
               for dp, _, fs in os.walk(os.path.join(run_dir, "checkpoints")) for f in fs)
    last = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[-1]
    per_ckpt = sum(os.path.getsize(os.path.join(run_dir, "checkpoints", last, f))
                   for f in os.listdir(os.path.join(run_dir, "checkpoints", last)))
    return {"mode": mode, "blocked_median_s": statistics.median(blocked), "blocked": blocked,
            "wall_s": wall, "checkpoint_bytes": per_ckpt, "disk_bytes": size}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3)
    args = p.parse_args()
    if not os.path.exists(NUWA):
        sys.exit(f"{NUWA}: build it first (cargo build --release)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ["synchronous", "background"]:
            r = run(mode, args, os.path.join(tmp, mode))
            results.append(r)
            print(f"{mode:>11}: blocked {r['blocked_median_s']:.3f} s per checkpoint "
                  f"({len(r['blocked'])} checkpoints of {r['checkpoint_bytes'] / 2**20:.0f} MiB), "
                  f"run {r['wall_s']:.1f} s")
    sync, bg = results
    ratio = bg["blocked_median_s"] / sync["blocked_median_s"]
    print(f"background / synchronous blocked time: {ratio:.3f}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(os.path.join(ROOT, "bench", "checkpoint_results.json"), "w") as f:
        json.dump({"when": stamp, "args": vars(args), "results": results, "ratio": ratio}, f,
                  indent=1)
    rows = "\n".join(
        f"| {r['mode']} | {r['blocked_median_s']:.3f} | {len(r['blocked'])} | "
        f"{r['checkpoint_bytes'] / 2**20:.0f} | {r['wall_s']:.1f} |" for r in results)
    doc = f"""# Checkpoints that don't stall training

Written by `python3 bench/checkpoint_bench.py` ({stamp}, `{os.cpu_count()}` CPUs): tiny-dense
at hidden {args.hidden}, {args.layers} layers, batch 2 × 64, {args.steps} steps with a checkpoint
every {args.every}. "Blocked" is the time a checkpoint step held training up
(`checkpoint_blocked_seconds` in metrics.jsonl): copying weights and AdamW's moments to host
memory, plus, synchronously, serialising, hashing, writing and fsyncing them.

| checkpoints | blocked per checkpoint, median (s) | checkpoints | size (MiB) | whole run (s) |
|---|---|---|---|---|
{rows}

Background writes hold a step up for **{ratio:.3f}×** the synchronous time. The write itself
still takes CPU and disk time beside training; one write is in flight at a time, so a checkpoint
due while the last is still being written waits for it (counted as blocked).
"""
    with open(os.path.join(ROOT, "docs", "CHECKPOINTS.md"), "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
