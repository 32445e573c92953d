"""Where a training step's time goes, per kind of work, with the kernels and on the reference
path (NUWA_KERNELS=reference), side by side: `perf record` on `nuwa bench train`, samples
grouped by the symbol they landed in. Prints a Markdown table and writes bench/step_profile.json.

    cargo build --release
    python3 bench/step_profile.py [--shape B] [--steps 8] [--threads 2]

Needs Linux `perf`. Shares are of all samples, set-up included (a few percent at 8 steps).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUWA = os.path.join(ROOT, "target", "release", "nuwa")

# First match wins: (kind, pattern on the symbol name).
KINDS = [
    ("matmul (gemm microkernels)", r"gemm_f32::microkernel|gemm_f32::gemm"),
    ("matmul (packing, dispatch)", r"gemm_common"),
    ("nuwa kernels (fused ops)", r"nuwa_model::kernels|pulp::"),
    ("exp/sin/cos/log (libm, scalar)", r"__expf|__exp|__sin|__cos|__log|__ieee754"),
    ("page faults (fresh memory)", r"clear_page|page_fault|do_anonymous|alloc_pages"),
    ("copies and fills", r"memmove|memcpy|memset|copy_2d|filled|into_contiguous|copy_contiguous"),
    ("elementwise and reductions (burn-flex)", r"burn_flex|macerator"),
    ("autodiff and allocator bookkeeping", r"burn_autodiff|mi_|hashbrown|alloc::"),
    ("threads and scheduling", r"rayon|crossbeam|futex|schedule|switch|\[k\]"),
]


def profile(shape, steps, threads, kernels, tmp):
    data = os.path.join(tmp, f"perf-{kernels}.data")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), NUWA_KERNELS=kernels)
    cmd = ["perf", "record", "-q", "-F", "499", "-o", data, NUWA, "bench", "train", "--shape",
           shape, "--steps", str(steps)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"perf record failed: {run.stderr.strip()}")
    tok = re.search(r"([0-9.]+) tokens/s", run.stdout + run.stderr)
    step = re.search(r"median step ([0-9.]+) s", run.stdout + run.stderr)
    report = subprocess.run(["perf", "report", "-i", data, "--sort", "symbol", "--stdio"],
                            capture_output=True, text=True).stdout
    shares = {kind: 0.0 for kind, _ in KINDS}
    shares["other"] = 0.0
    for line in report.splitlines():
        m = re.match(r"\s+([0-9.]+)%\s+(\[.\])\s+(.*)", line)
        if not m:
            continue
        share, symbol = float(m.group(1)), m.group(2) + " " + m.group(3)
        kind = next((k for k, p in KINDS if re.search(p, symbol)), "other")
        shares[kind] += share
    return {"tokens_per_s": float(tok.group(1)) if tok else None,
            "step_s": float(step.group(1)) if step else None, "shares": shares}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="B")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref = profile(a.shape, a.steps, a.threads, "reference", tmp)
        ker = profile(a.shape, a.steps, a.threads, "kernels", tmp)
    print(f"shape {a.shape}, {a.threads} threads: {ref['tokens_per_s']} tok/s reference path, "
          f"{ker['tokens_per_s']} tok/s with the kernels\n")
    print("| where the time goes | reference path | kernels | reference ms/step | kernels ms/step |")
    print("|---|---|---|---|---|")
    for kind in ref["shares"]:
        r, k = ref["shares"][kind], ker["shares"][kind]
        print(f"| {kind} | {r:.1f}% | {k:.1f}% | {r * ref['step_s'] * 10:.0f} | "
              f"{k * ker['step_s'] * 10:.0f} |")
    with open(os.path.join(ROOT, "bench", "step_profile.json"), "w") as f:
        json.dump({"args": vars(a), "reference": ref, "kernels": ker}, f, indent=1)


if __name__ == "__main__":
    main()
