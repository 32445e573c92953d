"""Expert and pipeline parallelism, measured on CPU ranks of this machine: EP and PP step time
against DP on 2 and 4 ranks, and on unequal ranks (rank 1 throttled 2x with the test-only
--throttle) the measured placement of experts and layers against an equal split, as a share of
the two ranks' summed throughput alone. Writes bench/parallel_results.json and
docs/PARALLEL.md (regenerated, never edited by hand).

    cargo build --release --features mpi,fault-injection    # needs Open MPI; --throttle is test-only
    python3 bench/parallel_bench.py [--steps 12] [--rounds 1]

Every rank runs one thread. Four ranks on this 2-core machine share two cores: their times
show the layouts' overheads under contention, not a 4-device speed-up.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUWA = os.path.join(ROOT, "target", "release", "nuwa")
BATCH, ACCUM, SEQ = 8, 4, 64
# Unequal ranks: a global batch of 64 sequences, as 4 micro-batches of 16 and (for the
# pipeline, whose bubble shrinks with more micro-batches) as 8 of 8; and for the pipeline a
# deeper model too (micro-batch rows, micro-batches, decoder layers): 4 layers cannot be
# staged 2 : 1 (3 : 1 leaves the fast rank 3 units to the slow one's 2). And the data and
# expert layouts again at twice the width (hidden 512, experts 512 wide): the work every rank
# does on every row under the split by width grows with the width, its expert work with the
# width squared.
# And the data layout and the split by width at four times the width (hidden 1024, experts
# 1024 wide): the split by width's work on every row whatever the columns (moving and summing
# hidden-wide rows) against its work on columns (hidden x width per row) falls as 1 / width.
LAYERS, HIDDEN = 4, 256
UNEQUAL = [(16, 4, LAYERS, HIDDEN), (8, 8, LAYERS, HIDDEN), (4, 16, 10, HIDDEN),
           (16, 4, LAYERS, 512), (16, 4, LAYERS, 1024)]
# The runs above start from initialisation, where the router sends nearly every token of a
# layer to two of its eight experts (the second half of 12 steps: what is timed). A training
# job spends nearly all its steps past that, with the loads evened out by the balance loss:
# the same unequal-rank layouts again, resumed from one process's checkpoint after WARM steps
# (the busiest expert of a layer then carries 1.1x the mean, at step 25-50 4x).
WARM, STEADY = 200, [256, 512]


def model(batch=BATCH, accum=ACCUM, layers=LAYERS, hidden=HIDDEN):
    return ["--preset", "tiny-moe", "--hidden-size", str(hidden), "--layers", str(layers),
            "--batch-size", str(batch), "--grad-accum", str(accum), "--seq-len", str(SEQ), "--quiet",
            "--sample-tokens", "0", "--eval-every", "100000", "--checkpoint-every", "100000"]


def start(np, flags, steps, run_dir, batch=BATCH, bind=True, accum=ACCUM, layers=LAYERS,
          hidden=HIDDEN):
    # Separate jobs at once must not be bound: each mpirun would pin its rank 0 to core 0.
    binding = [] if bind else ["--bind-to", "none"]
    cmd = ["mpirun", "--oversubscribe", *binding, "-np", str(np), "-x", "RAYON_NUM_THREADS", NUWA, "train",
           "--dist", "mpi", *model(batch, accum, layers, hidden), *flags, "--steps", str(steps), "--run-dir", run_dir]
    env = dict(os.environ, RAYON_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def result(proc, run_dir, tokens=None):
    if proc.wait() != 0:
        sys.exit(f"nuwa train failed (exit {proc.returncode})")
    records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    tokens = tokens or records[0]["tokens_seen"]  # one step's
    timed = records[len(records) // 2:]  # after the profile and the first re-placements
    seconds = sorted(r["step_seconds"] for r in timed)[len(timed) // 2]
    last = timed[-1]
    ranks = last.get("ranks", [])
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds,
        # Experts per rank, or (split by width) each expert's FFN columns per rank.
        "placement": (f"columns {last['expert_columns']}" if "expert_columns" in last
                      else f"{last['expert_placement']}, {last['expert_shared']} shared"
                      if "expert_shared" in last else last.get("expert_placement")),
        "stage_layers": last.get("stage_layers"),
        "seqs": [r["seqs"] for r in ranks],
        "a2a_s": [round(r.get("a2a_s", 0.0), 4) for r in ranks],
        "p2p_s": [round(r.get("p2p_s", 0.0), 4) for r in ranks],
        "bubble": [round(r.get("bubble", 0.0), 3) for r in ranks if "bubble" in r],
        "peak_rss_mib": [round(r.get("peak_rss_bytes", 0) / 2**20) for r in ranks],
    }


def warm_checkpoint(tmp, hidden):
    """One process trains the unequal-rank model WARM steps; its run folder (newest checkpoint
    at step WARM) is what the steady-state runs resume from."""
    run_dir = os.path.join(tmp, f"warm{hidden}")
    flags = model(16, 4, LAYERS, hidden)
    flags[flags.index("--checkpoint-every") + 1] = str(WARM)
    cmd = [NUWA, "train", *flags, "--steps", str(WARM), "--run-dir", run_dir]
    subprocess.run(cmd, check=True, env=dict(os.environ, RAYON_NUM_THREADS="1"),
                   stdout=subprocess.DEVNULL)
    return run_dir


def start_resumed(np, flags, steps, warm, run_dir, bind=True):
    """`steps` more steps of the warm run, in a copy of its folder, on `np` ranks."""
    shutil.copytree(warm, run_dir)
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    binding = [] if bind else ["--bind-to", "none"]
    cmd = ["mpirun", "--oversubscribe", *binding, "-np", str(np), "-x", "RAYON_NUM_THREADS", NUWA,
           "train", "--dist", "mpi", "--resume", run_dir, "--quiet", "--sample-tokens", "0",
           "--eval-every", "100000", "--checkpoint-every", "100000", *flags,
           "--steps", str(WARM + steps)]
    env = dict(os.environ, RAYON_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def run_resumed(np, flags, steps, warm):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        return result(start_resumed(np, flags, steps, warm, run_dir), run_dir, 16 * 4 * SEQ)


def both_alone_at_once_resumed(steps, warm):
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [os.path.join(tmp, "fast"), os.path.join(tmp, "slow")]
        procs = [start_resumed(1, ["--throttle", t], n, warm, d, bind=False)
                 for t, n, d in zip(["1", "2"], [2 * steps, steps], dirs)]
        return {"tokens_per_s": sum(result(p, d, 16 * 4 * SEQ)["tokens_per_s"]
                                    for p, d in zip(procs, dirs))}


def run(np, flags, steps, batch=BATCH, accum=ACCUM, layers=LAYERS, hidden=HIDDEN):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        return result(start(np, flags, steps, run_dir, batch=batch, accum=accum, layers=layers,
                            hidden=hidden), run_dir)


def both_alone_at_once(steps, batch=BATCH, accum=ACCUM, layers=LAYERS, hidden=HIDDEN):
    """The two ranks as independent one-process jobs at the same time: what this machine gives
    two processes that never communicate, the ceiling for the pair."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [os.path.join(tmp, "fast"), os.path.join(tmp, "slow")]
        procs = [start(1, ["--throttle", t], n, d, batch=batch, bind=False, accum=accum,
                       layers=layers, hidden=hidden)
                 for t, n, d in zip(["1", "2"], [2 * steps, steps], dirs)]
        return {"tokens_per_s": sum(result(p, d)["tokens_per_s"] for p, d in zip(procs, dirs))}


def model_file(tmp):
    """The bench's model as a config file a plan can name (written from a run's config)."""
    import tomllib
    run_dir = os.path.join(tmp, "cfg")
    result(start(1, [], 2, run_dir), run_dir)
    with open(os.path.join(run_dir, "config.toml"), "rb") as f:
        model = tomllib.load(f)["model"]

    def value(x):
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, str):
            return f'"{x}"'
        if isinstance(x, list):
            return "[" + ", ".join(value(i) for i in x) + "]"
        return repr(x)
    path = os.path.join(tmp, "model.toml")
    with open(path, "w") as f:
        f.writelines(f"{k} = {value(v)}\n" for k, v in model.items() if not isinstance(v, dict))
    return path


def predicted_vs_measured(steps):
    """Plan files for DP 2, DP 2 x EP 2 and PP 2 on two of this machine's cores: the cost
    model's step time (calibrated here, two calibrations at once as the two ranks run) against
    the runs `nuwa launch --plan` makes of them, as `nuwa plan verify` reports it."""
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = model_file(tmp)
        # The efficiency of this model here: one process on a replica's share of the batch,
        # beside a second one (as the two ranks share the machine), calibrated from its run.
        # The efficiency depends on the micro-batch's rows (per-micro-batch overheads, matmul
        # shapes), so each plan is priced with a calibration at its own micro-batch: 4 rows
        # for the replicas of DP 2, 8 for the pipeline's stages.
        cals = {}
        for rows in (BATCH // 2, BATCH):
            runs = [os.path.join(tmp, f"alone{rows}-{i}") for i in range(2)]
            procs = [start(1, [], steps, d, batch=rows, bind=False) for d in runs]
            for p, d in zip(procs, runs):
                result(p, d)
            cals[rows] = os.path.join(tmp, f"cal{rows}.json")
            subprocess.run([NUWA, "plan", "calibrate", "--from-run", runs[0], "--out", cals[rows]],
                           check=True, stdout=subprocess.DEVNULL)
        for name, layout, rows in [("DP 2", "dp = 2\nmicro_batch = 4", 4),
                                   ("DP 2 x EP 2", "dp = 2\nep = 2\nmicro_batch = 4", 4),
                                   ("PP 2", "pp = 2\ndp = 1\nmicro_batch = 8", 8)]:
            plan = os.path.join(tmp, "plan.toml")
            with open(plan, "w") as f:
                f.write(f'model = "{model_path}"\nseq_len = {SEQ}\nglobal_batch = {BATCH * ACCUM}\n'
                        f'[layout]\n{layout}\n[[part]]\ndevice = "local-cpu"\ncount = 2\n')
            subprocess.run([NUWA, "plan", "predict", "--plan", plan, "--calibration", cals[rows],
                            "--write"], check=True, stdout=subprocess.DEVNULL)
            run_dir = os.path.join(tmp, name.replace(" ", ""))
            subprocess.run([NUWA, "launch", "--plan", plan, "--mpirun-arg=-x",
                            "--mpirun-arg=RAYON_NUM_THREADS", "--", "--steps", str(steps), "--quiet",
                            "--sample-tokens", "0", "--eval-every", "100000", "--checkpoint-every",
                            "100000", "--run-dir", run_dir], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            v = json.loads(subprocess.run([NUWA, "plan", "verify", "--plan", plan, "--run", run_dir,
                                           "--json"], check=True, capture_output=True,
                                          text=True).stdout)
            out.append((name, v))
    return out


SHARED = ("EP 2 with shared experts, measured speeds", 2,
          ["--ep", "2", "--ep-split", "shared", "--throttle", "1,2", "--rebalance-every", "2"])


def steady_rows():
    """The unequal-rank layouts resumed from the warm checkpoint."""
    return [
        ("rank at speed 1.0 alone (one process)", 1, ["--throttle", "1"]),
        ("rank at speed 0.5 alone (one process)", 1, ["--throttle", "2"]),
        ("DP 2, throughput-balanced rows", 2, ["--throttle", "1,2", "--rebalance-every", "2"]),
        ("EP 2, measured placement", 2, ["--ep", "2", "--throttle", "1,2", "--rebalance-every", "2"]),
        ("EP 2 split by width, measured columns", 2,
         ["--ep", "2", "--ep-split", "width", "--throttle", "1,2", "--rebalance-every", "2"]),
        SHARED,
    ]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--predicted-only", action="store_true",
                   help="rerun only the predicted-vs-measured plans; the rest from parallel_results.json")
    p.add_argument("--only", action="append", default=[], metavar="PART",
                   help="rerun only the rows (alone runs included) whose names contain PART "
                        "(repeatable), --rounds times; the rest, and the predicted-vs-measured "
                        "plans, from parallel_results.json")
    a = p.parse_args()
    if not os.path.exists(NUWA):
        sys.exit("build nuwa first: cargo build --release --features mpi,fault-injection")
    s = a.steps
    even = [
        ("2 ranks: DP 2", 2, []),
        ("2 ranks: EP 2", 2, ["--ep", "2"]),
        ("2 ranks: PP 2", 2, ["--pp", "2"]),
        ("4 ranks: DP 4", 4, []),
        ("4 ranks: EP 4", 4, ["--ep", "4"]),
        ("4 ranks: DP 2 x EP 2", 4, ["--ep", "2"]),
        ("4 ranks: DP 2 x PP 2", 4, ["--pp", "2"]),
        ("4 ranks: DP 2 x EP 2 x PP 2", 4, ["--pp", "2", "--ep", "2"]),
    ]
    def uneven(batch, accum, layers, hidden):
        half = layers // 2
        rows = [
            ("rank at speed 1.0 alone (one process)", 1, ["--throttle", "1"]),
            ("rank at speed 0.5 alone (one process)", 1, ["--throttle", "2"]),
        ]
        if hidden == HIDDEN:
            rows += [
                (f"PP 2, equal stages ({half}, {layers - half})", 2,
                 ["--pp", "2", "--throttle", "1,2", "--stage-layers", f"{half},{layers - half}"]),
                ("PP 2, measured stages", 2, ["--pp", "2", "--throttle", "1,2"]),
            ]
        if (batch, accum, layers) == UNEQUAL[0][:3]:
            dp = ("DP 2, throughput-balanced rows", 2, ["--throttle", "1,2", "--rebalance-every", "2"])
            width = ("EP 2 split by width, measured columns", 2,
                     ["--ep", "2", "--ep-split", "width", "--throttle", "1,2", "--rebalance-every", "2"])
            by_experts = [
                *([("EP 2, equal experts and rows", 2,
                    ["--ep", "2", "--throttle", "1,2", "--rebalance-every", "0"])]
                  if hidden == HIDDEN else []),
                ("EP 2, measured placement", 2, ["--ep", "2", "--throttle", "1,2", "--rebalance-every", "2"]),
                SHARED,
            ]
            # At hidden 1024 steps take seconds: the data layout and the split by width only.
            rows[2:2] = [dp, *(by_experts if hidden < 1024 else []), width]
        return rows
    configs = [(n, lambda np=np, f=f: run(np, f, s)) for n, np, f in even]
    warm_dir = tempfile.TemporaryDirectory()
    warm = {}  # hidden -> the warm run's folder, trained on first use

    def warmed(hidden):
        if hidden not in warm:
            warm[hidden] = warm_checkpoint(warm_dir.name, hidden)
        return warm[hidden]
    for hidden in STEADY:
        key = f"steady, hidden {hidden}: "
        configs += [(key + n, lambda np=np, f=f, h=hidden: run_resumed(np, f, s, warmed(h)))
                    for n, np, f in steady_rows()]
        configs.append((key + "both alone at the same time (no communication)",
                        lambda h=hidden: both_alone_at_once_resumed(s, warmed(h))))
    def key_of(batch, accum, layers, hidden):
        key = f"{batch}x{accum}" if layers == LAYERS else f"{batch}x{accum}, {layers} layers"
        return (key if hidden == HIDDEN else f"{key}, hidden {hidden}") + ": "
    for batch, accum, layers, hidden in UNEQUAL:
        key = key_of(batch, accum, layers, hidden)
        configs += [(key + n, lambda np=np, f=f, b=batch, m=accum, l=layers, h=hidden:
                     run(np, f, s, b, m, l, h))
                    for n, np, f in uneven(batch, accum, layers, hidden)]
        configs.append((key + "both alone at the same time (no communication)",
                        lambda b=batch, m=accum, l=layers, h=hidden: both_alone_at_once(s, b, m, l, h)))
    results_path = os.path.join(ROOT, "bench", "parallel_results.json")
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    only = a.only
    kept = None
    if a.predicted_only or only:
        with open(results_path) as f:
            kept = json.load(f)
    if a.predicted_only:
        results = kept["results"]
    else:
        chosen = [(n, c) for n, c in configs if not only or any(part in n for part in only)]
        if not chosen:
            sys.exit(f"--only {only}: no row's name contains one")
        rounds = [[c() for _, c in chosen] for _ in range(max(1, a.rounds))]
        median = lambda i: sorted((r[i] for r in rounds), key=lambda x: x["tokens_per_s"])[len(rounds) // 2]
        measured = {name: median(i) for i, (name, _) in enumerate(chosen)}
        if only:
            for r in measured.values():
                r.update(rounds=a.rounds, date=now)
        results = {**(kept["results"] if only else {}), **measured}
    verified = (kept["predicted_vs_measured"].items() if only else predicted_vs_measured(s))
    # With --predicted-only or --only the other rows keep the date and rounds they were
    # measured with (rows rerun with --only carry their own).
    date = kept["date"] if kept else now
    if kept:
        a.rounds = kept["rounds"]
    with open(results_path, "w") as f:
        json.dump({"date": date, "verified_date": kept["verified_date"] if only else now,
                   "steps": s, "rounds": a.rounds,
                   "results": results, "predicted_vs_measured": dict(verified)}, f, indent=1)

    def fmt(v):
        return "" if v is None else str(v)

    def named(name, r):
        """A row's name, with its rounds and date when rerun apart from the rest (--only)."""
        if r.get("date", date) == date:
            return name
        return f"{name} ({r['rounds']} round{'s' if r['rounds'] > 1 else ''}, {r['date'][:10]})"

    lines = [
        "# Expert and pipeline parallelism on CPU ranks",
        "",
        "Generated by `bench/parallel_bench.py` — do not edit by hand. MPI ranks on this machine,",
        f"one thread each. MoE model: tiny-moe at hidden 256, 4 layers (3 MoE, 8 experts, top-2), "
        f"global batch {BATCH * ACCUM} sequences of {SEQ} tokens as {ACCUM} micro-batches of {BATCH} "
        "(`--grad-accum`, the pipeline's micro-batches). Tokens/s from the median step of the second "
        f"half of {s} steps; the median of {a.rounds} round(s).",
        "",
        f"- date: {date}" + ("" if date == now else f" (predicted and measured step time: {now})"),
        "",
        "## Layouts on equal ranks",
        "",
        "Four ranks share this machine's two cores: the 4-rank rows show each layout's overhead under",
        "contention, not a speed-up. Per-rank columns: seconds in the expert all-to-all, seconds",
        "blocked on pipeline neighbours, the pipeline bubble (idle share of the schedule), peak RSS.",
        "",
        "| layout | tokens/s | vs DP | all-to-all s | p2p wait s | bubble | peak RSS MiB |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for name, np, _ in even:
        r = results[name]
        dp = results[f"{np} ranks: DP {np}"]["tokens_per_s"]
        lines.append(f"| {named(name, r)} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / dp:.2f}x | "
                     f"{r['a2a_s']} | {r['p2p_s']} | {fmt(r['bubble'] or None)} | {r['peak_rss_mib']} |")
    lines += [
        "",
        "## Unequal ranks: rank 1 at half speed",
        "",
        "A global batch of 64 sequences of 64 tokens, as 4 micro-batches of 16 and, for the "
        "pipeline (whose bubble shrinks as micro-batches grow in number), as 8 of 8, and for the "
        "pipeline again on the model at 10 layers as 16 of 4 (4 layers cannot be staged 2 : 1: "
        "3 : 1 leaves the fast rank 3 layers' time to the slow one's 2; real models have 20 to 80). "
        "\"EP split by width\" is `--ep-split width`: each rank holds a share of every expert's FFN "
        "columns and runs every row on them, so its expert work does not depend on where the "
        "router sends tokens (the placement by experts gives the fast rank the 5 experts that, "
        "this early in training, carry 70–97% of the rows); its rows follow its speed outside the "
        "expert phase and its columns are fitted to what its expert phase took (work on its "
        "columns plus work on every row whatever the columns). The last two blocks are the model at "
        "twice and four times the width (hidden 512, experts 512 wide; hidden 1024, experts 1024 "
        "wide): the work every rank does on every row under the split by width (moving and summing "
        "hidden-wide rows) falls against its work on its columns as 1 / width. \"Of the sum "
        "alone\" is the job's throughput over the two ranks' throughputs each alone (a one-process "
        "run at its speed, same micro-batches); \"of both at once\" over the two run as independent "
        "jobs at the same time — the most this machine gives two processes that share its cores. "
        "Rows per rank are per step. \"EP 2 with shared experts\" is `--ep-split shared`: whole "
        "experts per rank, as many as its speed earns, but the two ranks share the experts around "
        "where their ranges meet (two of eight) and split those experts' rows afresh in every "
        "micro-batch by their speeds, from the counts gathered before the exchange: each row runs "
        "on one rank (no work done twice, as the split by width does). Each MoE layer lays its "
        "experts over the ranks' slots in an order of its own, chosen from its last step's loads "
        "when the current one balances worse than 97%: its busiest experts in the shared slots, "
        "the rest spread by room under each rank's share — this early in training a layer's router "
        "sends nearly all tokens to two experts, different in every layer and moving from step to "
        "step; a new order moves only the experts a rank lacked (its time is in the step's).",
        "",
        "| micro-batches (layers) | run | tokens/s | of the sum alone | of both at once | experts per rank | layers per stage | rows per rank |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    def share_rows(key, names, label, columns):
        """A block's table rows: tokens/s, the share of the two ranks' throughputs each alone
        and of both alone at once, then `columns` of the run."""
        both = "both alone at the same time (no communication)"
        fast = results[key + "rank at speed 1.0 alone (one process)"]["tokens_per_s"]
        slow = results[key + "rank at speed 0.5 alone (one process)"]["tokens_per_s"]
        together = results[key + both]["tokens_per_s"]
        out = []
        for name in names + [both]:
            r = results[key + name]
            t = r["tokens_per_s"]
            alone = name.endswith("(one process)")
            cells = [label, named(name, r), f"{t:.0f}", "" if alone else f"{t / (fast + slow):.1%}",
                     "" if alone else f"{t / together:.1%}", *(fmt(r.get(c)) for c in columns)]
            out.append("| " + " | ".join(cells) + " |")
        return out
    for batch, accum, layers, hidden in UNEQUAL:
        names = [n for n, _, _ in uneven(batch, accum, layers, hidden)]
        shape = f"{layers}" if hidden == HIDDEN else f"{layers}, hidden {hidden}"
        lines += share_rows(key_of(batch, accum, layers, hidden), names,
                            f"{accum} x {batch} ({shape})", ["placement", "stage_layers", "seqs"])
    lines += [
        "",
        "## Unequal ranks in steady state: rank 1 at half speed, resumed after training",
        "",
        f"The runs above time steps 7-12 from initialisation, when each layer's router sends nearly "
        f"all tokens to two of its eight experts, and which two moves from step to step. A "
        f"training job spends nearly all its steps past that: here one process first trains the "
        f"model {WARM} steps (the busiest expert of a layer then carries about 1.1x the mean "
        f"load), and every layout resumes its checkpoint for {s} more steps (64 sequences of "
        f"64 tokens as 4 micro-batches of 16; timed as above). The data layout and the split by "
        f"width do not depend on the router; the placements by experts do.",
        "",
        "| model | run | tokens/s | of the sum alone | of both at once | experts per rank | rows per rank |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for hidden in STEADY:
        lines += share_rows(f"steady, hidden {hidden}: ", [n for n, _, _ in steady_rows()],
                            f"hidden {hidden}, after {WARM} steps", ["placement", "seqs"])
    lines += [
        "",
        "## Predicted and measured step time",
        "",
        "`nuwa plan predict` on a plan file for two of this machine's cores (the cost model, with",
        "the efficiency `nuwa plan calibrate --from-run` took from one process training this model",
        "in the plan's micro-batches — 4 rows for DP 2, 8 for PP 2 — beside a second such process,",
        "as the two ranks share the machine), the plan run by `nuwa launch --plan`, compared by `nuwa plan verify --plan",
        "--run`. Goal: within 15%. Peak RSS against the planner's memory model, which prices",
        "what `nuwa train` keeps: f32 weights, gradients and AdamW moments on every rank that",
        "holds a parameter, and the trainer's own estimate of the activations of the micro-batches",
        "in flight.",
        "",
        "\"The model took\" is each rank's peak less what it held before it built its part of the",
        "model (program, MPI, data): what the memory model is about.",
        "",
        "| plan | predicted s/step | measured s/step | error | planner memory GB/device | peak RSS GB per rank | the model took GB per rank |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, v in verified:
        gb = lambda key: [round(b / 1e9, 3) for b in v.get(key, [])]
        lines.append(f"| {name} | {v['predicted_step_s']:.3f} | {v['measured_step_s']:.3f} | "
                     f"{v['relative_error']:+.0%} | {v['predicted_memory_bytes_per_part'][0] / 1e9:.3f} | "
                     f"{gb('measured_peak_rss_bytes_per_rank')} | {gb('measured_model_bytes_per_rank')} |")
    with open(os.path.join(ROOT, "docs", "PARALLEL.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
