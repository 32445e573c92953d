"""Runs nuwa and PyTorch side by side on every benchmark shape, in one run, and writes the
ratios: bench/results.json and docs/PERFORMANCE.md (regenerated, never edited by hand).

    bash bench/setup.sh                 # once: a virtualenv with PyTorch (CPU)
    .venv-bench/bin/python bench/compare.py [--threads 2] [--steps 10]
    .venv-bench/bin/python bench/compare.py --baseline OLD/target/release/nuwa

`--precision bf16` runs the training shapes with bf16 weight products on both sides (nuwa's
`--precision bf16`; PyTorch under `torch.autocast("cpu", torch.bfloat16)`) and writes
bench/results-bf16.json and docs/PERFORMANCE-bf16.md instead.

`--baseline` runs a second nuwa binary (say, a build of the previous commit) in the same pass,
in turn with this one, and reports its ratio beside this one's: a change is judged against its
baseline on the same machine at the same time, not against numbers from another day.

Each side runs as its own process with the same thread count, so peak memory (each process's
own VmHWM) is measured per side. Each side runs `--repeats` times (default 2), alternating, and
its fastest run counts: a hiccup of a shared machine then costs neither side its number.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUWA = os.path.join(ROOT, "target", "release", "nuwa")
TORCH = os.path.join(ROOT, "bench", "torch_bench.py")
CASES = [("train", "A"), ("train", "B"), ("train", "C"), ("train", "C-dense"), ("decode", "D")]


def run(cmd, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    # Each side reports its own VmHWM. ru_maxrss (KiB on Linux) is the fallback only: it keeps
    # the high-water mark across exec, so it would count this Python's memory as the child's.
    if result.get("peak_rss_mib") is None:
        result["peak_rss_mib"] = usage.ru_maxrss / 1024.0
    return result


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="*", help="shapes to run (default: all)")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each side, alternating; each side's fastest counts (a shared "
                        "machine's hiccups hit one run, not both)")
    p.add_argument("--baseline", help="another nuwa binary to run beside this one")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile column (inductor compiles each shape for minutes)")
    p.add_argument("--baseline-label", help="what the baseline is, for the report (default: its path)")
    a = p.parse_args()
    if not os.path.exists(NUWA):
        sys.exit("build nuwa first: cargo build --release")
    # Fail early if the venv is missing (in a child: importing torch here would not count
    # against either side, but there is no need to hold it).
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode:
        sys.exit("PyTorch is missing: bash bench/setup.sh, then run this with .venv-bench/bin/python")

    rows = []
    for kind, shape in CASES:
        if a.only and shape not in a.only:
            continue
        if a.precision == "bf16" and kind != "train":
            continue
        common = [kind, "--shape", shape, "--warmup", str(a.warmup), "--steps", str(a.steps), "--json",
                  "--precision", a.precision]
        torch_cmd = [sys.executable, TORCH, *common, "--threads", str(a.threads)]
        fastest = lambda *rs: max(rs, key=lambda r: r["tokens_per_s"])  # noqa: E731
        theirs = run(torch_cmd, a.threads)
        compiled = None
        if kind == "train" and not a.no_compile and a.precision == "f32":
            compiled = run([sys.executable, TORCH, *common, "--threads", str(a.threads), "--compile"],
                           a.threads)
        if a.baseline:
            # In turn, A B B A, each side's faster run: neither gains from its place in line.
            runs = [run([exe, "bench", *common], a.threads)
                    for exe in (NUWA, a.baseline, a.baseline, NUWA)]
            ours = max(runs[0], runs[3], key=lambda r: r["tokens_per_s"])
            base = max(runs[1], runs[2], key=lambda r: r["tokens_per_s"])
        else:
            ours, base = run([NUWA, "bench", *common], a.threads), None
        for _ in range(a.repeats - 1):
            theirs = fastest(theirs, run(torch_cmd, a.threads))
            if not a.baseline:
                ours = fastest(ours, run([NUWA, "bench", *common], a.threads))
        row = {
            "kind": kind,
            "shape": shape,
            "nuwa_tokens_per_s": ours["tokens_per_s"],
            "torch_tokens_per_s": theirs["tokens_per_s"],
            "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "torch_compile_tokens_per_s": compiled["tokens_per_s"] if compiled else None,
            "compile_ratio": ours["tokens_per_s"] / compiled["tokens_per_s"] if compiled else None,
            "nuwa_peak_rss_mib": ours["peak_rss_mib"],
            "torch_peak_rss_mib": theirs["peak_rss_mib"],
            "nuwa_mfu": ours["mfu"],
            "baseline_tokens_per_s": base["tokens_per_s"] if base else None,
            "baseline_ratio": base["tokens_per_s"] / theirs["tokens_per_s"] if base else None,
            "nuwa_phases_s": ours.get("phases"),
            "torch_phases_s": theirs.get("phases"),
            "threads": a.threads,
            "torch_version": theirs["torch"],
        }
        rows.append(row)
        print(f"{kind:6} {shape:8} nuwa {row['nuwa_tokens_per_s']:9.0f} tok/s  torch "
              f"{row['torch_tokens_per_s']:9.0f} tok/s  ratio {row['ratio']:.2f}  "
              f"RSS {row['nuwa_peak_rss_mib']:.0f}/{row['torch_peak_rss_mib']:.0f} MiB"
              + (f"  compiled {row['torch_compile_tokens_per_s']:.0f} tok/s ratio "
                 f"{row['compile_ratio']:.2f}" if compiled else "")
              + (f"  baseline ratio {row['baseline_ratio']:.2f}" if base else ""), flush=True)

    moe = next((r for r in rows if r["shape"] == "C"), None)
    dense = next((r for r in rows if r["shape"] == "C-dense"), None)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "threads": a.threads,
        "baseline": a.baseline_label or a.baseline,
        "precision": a.precision,
        "rows": rows,
        "moe_over_dense_step_time": (dense["nuwa_tokens_per_s"] / moe["nuwa_tokens_per_s"]) if moe and dense else None,
    }
    suffix = "" if a.precision == "f32" else f"-{a.precision}"
    with open(os.path.join(ROOT, "bench", f"results{suffix}.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_markdown(report, suffix)


def write_markdown(r, suffix):
    bf16 = r.get("precision") == "bf16"
    lines = [
        "# Performance: nuwa vs PyTorch" + (", bf16 weight products" if bf16 else ""),
        "",
        "Generated by `bench/compare.py` — do not edit by hand. Same model, shapes, fp32, batch and",
        "AdamW on both sides; tokens/s is from the median of the timed steps after warm-up.",
        *(["Weight products in bf16 × bf16 → f32 on both sides: nuwa `--precision bf16`, PyTorch",
           "under `torch.autocast(\"cpu\", torch.bfloat16)`; master weights and AdamW f32."] if bf16 else []),
        "PyTorch runs eager, and again with `torch.compile` (inductor's CPU code generation; the",
        "model only, the optimiser eager) where a torch.compile column is shown.",
        "",
        f"- date: {r['date']}",
        f"- CPU: {r['cpu']}, {r['threads']} threads on each side",
        "",
    ]
    based = any(row.get("baseline_ratio") for row in r["rows"])
    compiled = any(row.get("compile_ratio") for row in r["rows"])
    if based:
        lines += [f"- baseline: {r['baseline']}, run in turn with this build", ""]
    lines += [
        "| run | shape | nuwa tok/s | PyTorch tok/s | nuwa ÷ PyTorch | nuwa peak RSS MiB | PyTorch peak RSS MiB | nuwa MFU |"
        + (" torch.compile tok/s | nuwa ÷ torch.compile |" if compiled else "")
        + (" baseline ÷ PyTorch |" if based else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if compiled else "")
        + ("---:|" if based else ""),
    ]
    for row in r["rows"]:
        mfu = f"{100 * row['nuwa_mfu']:.1f}%" if row["nuwa_mfu"] is not None else "—"
        lines.append(
            f"| {row['kind']} | {row['shape']} | {row['nuwa_tokens_per_s']:.0f} | {row['torch_tokens_per_s']:.0f} | "
            f"{row['ratio']:.2f} | {row['nuwa_peak_rss_mib']:.0f} | {row['torch_peak_rss_mib']:.0f} | {mfu} |"
            + ((f" {row['torch_compile_tokens_per_s']:.0f} | {row['compile_ratio']:.2f} |"
                if row.get("compile_ratio") else " — | — |") if compiled else "")
            + (f" {row['baseline_ratio']:.2f} |" if based else "")
        )
    phased = [row for row in r["rows"] if row.get("nuwa_phases_s") and row.get("torch_phases_s")]
    if phased:
        lines += ["", "Where a training step's time goes (median seconds, nuwa / PyTorch):", "",
                  "| shape | forward + loss | backward | optimizer |", "|---|---:|---:|---:|"]
        for row in phased:
            cells = [f"{n:.3f} / {t:.3f}" for n, t in zip(row["nuwa_phases_s"], row["torch_phases_s"])]
            lines.append(f"| {row['shape']} | " + " | ".join(cells) + " |")
    if r["moe_over_dense_step_time"] is not None:
        lines += ["", f"MoE C step time ÷ dense model with the same active parameters (C-dense): "
                      f"{r['moe_over_dense_step_time']:.2f}"]
    lines += [
        "",
        "Shapes: A dense, vocab 65, 4 layers, 4 heads, hidden 128, context 64, batch 12; B dense, vocab",
        "8192, 6 layers, 6 heads, hidden 384, context 256, batch 8; C as B with 16 routed experts top-2,",
        "1 shared, expert width 256; C-dense as B with FFN width 768 (C's active width); D decode of",
        "shape B at batch 1 with a KV cache, 256 new tokens after a 16-token prompt.",
        "",
    ]
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    with open(os.path.join(ROOT, "docs", f"PERFORMANCE{suffix}.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
