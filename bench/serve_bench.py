"""Serving benchmark: `nuwa serve` and llama.cpp's server (llama-cpp-python from PyPI) on the
same model (shape D trained briefly by nuwa, exported, converted with llama.cpp's converter),
the same machine and the same threads. Measures aggregate completion tokens/s and time to
first token at 1, 8 and 32 concurrent streams, and the prefix cache: a shared ~1K-token system
prompt, time to first token of a second request against the first. Also reports the tiny test
fixture. Writes bench/serve_results.json and docs/SERVING.md (regenerated, never by hand).

    bash bench/setup.sh && cargo build --release
    .venv-bench/bin/python bench/serve_bench.py [--threads 2] [--requests 64] [--max-tokens 64]
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import llamacpp_compare as lc  # noqa: E402  (model preparation shared with the decode benchmark)

NUWA = os.path.join(ROOT, "target", "release", "nuwa")
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
# Prompts every benchmark model can encode (words of the fixture's vocabulary).
PROMPTS = [f"w{i} w{(i * 7) % 80}" for i in range(80)]
CONTEXT = 2048


def request(url, body, stream):
    """Sends one completion; returns (completion tokens, seconds to first text, seconds)."""
    body = dict(body, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        if not stream:
            out = json.loads(r.read())
            return out["usage"]["completion_tokens"], None, time.perf_counter() - t0
        # Only the first text chunk (its time) and the usage chunk are parsed: the client shares
        # the machine's cores with the server, so it does as little per token as it can.
        pieces, tokens = 0, None
        for line in r:
            if not line.startswith(b"data:"):
                continue
            if first is None or b'"usage"' in line:
                if line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - t0
            pieces += 1
    # A server without `include_usage` is counted by its chunks (one per token for both here).
    return (tokens if tokens is not None else max(0, pieces - 2)), first, time.perf_counter() - t0


def load(url, requests, concurrency, max_tokens):
    """`requests` streamed completions by `concurrency` clients: tokens/s and TTFT."""
    ttfts, tokens, lock = [], [0], threading.Lock()
    queue = list(range(requests))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            n, first, _ = request(url, {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                                        "temperature": 0.8, "seed": i}, stream=True)
            with lock:
                tokens[0] += n
                if first is not None:
                    ttfts.append(first)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    pct = lambda p: ttfts[min(len(ttfts) - 1, int(len(ttfts) * p))] if ttfts else float("nan")
    return {"concurrency": concurrency, "requests": requests, "tokens": tokens[0],
            "tokens_per_s": tokens[0] / wall, "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99)}


def prefix_cache(url, system):
    """TTFT of two requests sharing `system` (first computes it, the second may reuse it)."""
    out = []
    for question in ["Who speaks first?", "What is the last word?"]:
        _, first, _ = request(url, {"prompt": system + "\n" + question, "max_tokens": 4,
                                    "temperature": 0.0}, stream=True)
        out.append(first)
    return {"first_ttft_s": out[0], "second_ttft_s": out[1], "ratio": out[1] / out[0]}


def wait_ready(url, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return
        except Exception:
            time.sleep(0.5)
    sys.exit("server did not start")


def serve_nuwa(source, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    proc = subprocess.Popen([NUWA, "serve", *source, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    base = next(w for w in line.split() if w.startswith("http://"))
    wait_ready(base, proc)
    return proc, base


def serve_llama(gguf, threads, port=8391):
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf,
                             "--n_threads", str(threads), "--n_threads_batch", str(threads),
                             "--n_ctx", str(CONTEXT), "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    return proc, base


def measure(server, args, system):
    proc, base = server
    try:
        url = base + "/v1/completions"
        request(url, {"prompt": PROMPTS[0], "max_tokens": 8}, stream=False)  # warm up
        rows = [load(url, args.requests, c, args.max_tokens) for c in (1, 8, 32)]
        prefix = prefix_cache(url, system) if system else None
    finally:
        proc.terminate()
        proc.wait()
    for r in rows:
        r["x_one_stream"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {"rows": rows, "prefix": prefix}


def long_context_copy(hf, work):
    """The HF folder with a 2K context (same weights) so a 1K system prompt fits."""
    out = os.path.join(work, "hf-2k")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(hf):
        if name != "config.json" and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.abspath(os.path.join(hf, name)), os.path.join(out, name))
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = CONTEXT
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out


# A larger shape ("E": GPT-2-small-like, 120M parameters, 480 MB in f32) where one decode step
# at batch 1 is dominated by streaming the weights, not by per-op overhead.
LARGE = dict(lc.MODEL, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=CONTEXT)


def make_large(work, threads):
    """Shape E: initialised and trained 2 steps by nuwa on D's data, exported (throughput does
    not depend on how well it is trained; the tokenizer has no end token, so every request
    runs to max_tokens on both servers)."""
    hf = os.path.join(work, "hf-e")
    if os.path.isfile(os.path.join(hf, "model.safetensors")):
        return hf
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    config = os.path.join(work, "llama-e.json")
    with open(config, "w") as f:
        json.dump(LARGE, f)
    print("nuwa: shape E, 2 training steps, export", flush=True)
    lc.sh([NUWA, "train", "--model-config", config, "--data", os.path.join(work, "data"),
           "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--run-dir",
           os.path.join(work, "run-e"), "--quiet", "--sample-tokens", "0"], env)
    lc.sh([NUWA, "export", os.path.join(work, "run-e"), "--out", hf], env)
    return hf


def system_prompt(tokens):
    """About `tokens` BPE tokens of Shakespeare (~4 characters each)."""
    with open(SHAKESPEARE) as f:
        return f.read()[: tokens * 4]


def table(title, rows):
    lines = [f"**{title}**", "",
             "| streams | tokens/s | × one stream | TTFT p50 | TTFT p99 |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['tokens_per_s']:.0f} | {r['x_one_stream']:.2f} | "
                     f"{1e3 * r['ttft_p50_s']:.0f} ms | {1e3 * r['ttft_p99_s']:.0f} ms |")
    return lines + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--work", default=os.path.join(lc.CACHE, "llamacpp-d"))
    p.add_argument("--no-llama", action="store_true", help="nuwa only")
    a = p.parse_args()
    if not os.path.exists(NUWA):
        sys.exit("build nuwa first: cargo build --release")
    os.makedirs(a.work, exist_ok=True)
    hf = long_context_copy(lc.make_model(a.work, NUWA, 150, a.threads), a.work)
    system = system_prompt(1000)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "threads": a.threads, "requests": a.requests, "max_tokens": a.max_tokens}
    print("tiny fixture (nuwa)", flush=True)
    fixture = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
    results["fixture"] = measure(serve_nuwa(["--model", fixture], a.threads), a, None)
    print("shape D (nuwa)", flush=True)
    results["nuwa"] = measure(serve_nuwa(["--model", hf], a.threads), a, system)
    large = make_large(a.work, a.threads)
    print("shape E (nuwa)", flush=True)
    results["nuwa_e"] = measure(serve_nuwa(["--model", large], a.threads), a, None)
    if not a.no_llama:
        import llama_cpp

        tree = lc.llama_cpp_sources(None)
        gguf = os.path.join(a.work, "d-f32.gguf")
        lc.convert(lc.make_model(a.work, NUWA, 150, a.threads), tree, gguf)
        print("shape D (llama.cpp server)", flush=True)
        results["llama_cpp_python"] = llama_cpp.__version__
        results["llama"] = measure(serve_llama(gguf, a.threads), a, system)
        gguf_e = os.path.join(a.work, "e-f32.gguf")
        lc.convert(large, tree, gguf_e)
        print("shape E (llama.cpp server)", flush=True)
        results["llama_e"] = measure(serve_llama(gguf_e, a.threads), a, None)
    for name in ["fixture", "nuwa", "llama", "nuwa_e", "llama_e"]:
        for r in results.get(name, {}).get("rows", []):
            print(f"{name:>8} {r['concurrency']:>3} streams: {r['tokens_per_s']:7.0f} tok/s "
                  f"x{r['x_one_stream']:.2f}  TTFT p50 {1e3 * r['ttft_p50_s']:.0f} ms "
                  f"p99 {1e3 * r['ttft_p99_s']:.0f} ms")
    for suffix in ["", "_e"]:
        if "llama" + suffix in results:
            ratio = {str(n["concurrency"]): n["tokens_per_s"] / l["tokens_per_s"]
                     for n, l in zip(results["nuwa" + suffix]["rows"],
                                     results["llama" + suffix]["rows"])}
            results["ratio" + suffix] = ratio
            print(f"nuwa ÷ llama.cpp tokens/s{suffix}:", {k: round(v, 2) for k, v in ratio.items()})
    for name in ["nuwa", "llama"]:
        if results.get(name, {}).get("prefix"):
            pc = results[name]["prefix"]
            print(f"{name} prefix cache: TTFT {1e3 * pc['first_ttft_s']:.0f} ms then "
                  f"{1e3 * pc['second_ttft_s']:.0f} ms (x{pc['ratio']:.2f})")
    with open(os.path.join(ROOT, "bench", "serve_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    write_doc(results, a)


def write_doc(r, a):
    lines = ["# Serving throughput", "",
             "Generated by `bench/serve_bench.py` — do not edit by hand. Completion requests "
             f"({a.requests} per row, {a.max_tokens} tokens each, temperature 0.8, streamed) sent by N "
             "concurrent clients; 1 client is the one-at-a-time baseline. Time to first token (TTFT) "
             "is measured by the client, from sending the request to the first text.", "",
             f"- date: {r['date']}; threads: {r['threads']}",
             "- model: shape D (hidden 384, 6 layers, vocabulary 8192; 20.5M parameters, f32), "
             "trained 150 steps by nuwa on tinyshakespeare, exported, and for llama.cpp converted "
             "with its `convert_hf_to_gguf.py --outtype f32`; context raised to 2048 for the "
             "prefix test", ""]
    lines += ["- shape E: hidden 768, 12 layers, 12 heads, FFN 3072, vocabulary 8192 (120M "
              "parameters, 480 MB in f32; a decode step at one stream streams the weights), "
              "initialised and trained 2 steps by nuwa, exported and converted the same way", ""]
    for suffix, shape in [("_e", "E"), ("", "D")]:
        lines += table(f"nuwa serve, shape {shape}", r["nuwa" + suffix]["rows"])
        if "llama" + suffix in r:
            lines += table(f"llama.cpp server (llama-cpp-python {r['llama_cpp_python']}), "
                           f"shape {shape}", r["llama" + suffix]["rows"])
            lines += [f"**shape {shape}, nuwa ÷ llama.cpp, aggregate tokens/s:** " + ", ".join(
                f"{k} streams {v:.2f}×" for k, v in r["ratio" + suffix].items()), ""]
    if "llama" in r:
        lines += [
                  "llama-cpp-python's server (the llama.cpp server on PyPI) runs one request at a "
                  "time behind a lock — it has no continuous batching, so its throughput does not "
                  "grow with streams (here it fell, the waiting requests contending for the lock) "
                  "and its TTFT grows with the queue. llama.cpp's own C++ "
                  "`llama-server` batches (the ×11 at 32 streams its maintainers report); it is not "
                  "on PyPI and is not measured here. At one stream the comparison is engine against "
                  "engine plus each server's per-token overhead (llama-cpp-python streams every "
                  "token through Python).", ""]
    lines += ["**Prefix cache** (a ~1K-token system prompt, then a second request sharing it):", "",
              "| server | first TTFT | second TTFT | second ÷ first |", "|---|---:|---:|---:|"]
    for name, label in [("nuwa", "nuwa"), ("llama", "llama.cpp")]:
        pc = r.get(name, {}).get("prefix")
        if pc:
            lines.append(f"| {label} | {1e3 * pc['first_ttft_s']:.0f} ms | "
                         f"{1e3 * pc['second_ttft_s']:.0f} ms | {pc['ratio']:.2f} |")
    lines += [""] + table("nuwa serve, tiny test fixture (`tests/fixtures/hf/llama`; a decode "
                          "step here is fixed overhead)", r["fixture"]["rows"])
    with open(os.path.join(ROOT, "docs", "SERVING.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
