#!/usr/bin/env python3
"""disp next to HF transformers / PyTorch on one model, alternating, with medians and ratios.

Run through bench/compare.sh (it builds the release binary and finds the python env). Each round
runs, in this order, disp then PyTorch for: eval perplexity (16 windows of 512 tokens), prefill +
decode (512-token prompt, 64 decoded tokens), and the search step (seq 512, five-site gates,
hypernetwork, AdamW). `--compute bf16` runs disp's eval and prefill/decode with bf16 products and
`--torch-dtype bfloat16` loads PyTorch's model in bf16 for them (the search step is f32 on both
sides). Every figure is a median over rounds of each run's own median; the ratio
column is disp / PyTorch in speed (>1: disp is faster). Prints a markdown table.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd, env):
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    print(f"  {time.perf_counter() - t0:6.1f}s  {' '.join(os.path.basename(c) if i < 2 else c for i, c in enumerate(cmd))[:110]}",
          file=sys.stderr, flush=True)
    return json.loads(line)


def print_table(rows, out):
    print("| work | disp | PyTorch | disp speed / PyTorch speed |", file=out)
    print("| --- | --- | --- | --- |", file=out)
    for name, (d, p, unit, higher) in rows.items():
        if name.startswith("_"):
            continue
        dm, pm = statistics.median(d), statistics.median(p)
        ratio = dm / pm if higher else pm / dm
        per = [(a / b if higher else b / a) for a, b in zip(d, p)]
        print(f"| {name} | {dm:.3g} {unit} | {pm:.3g} {unit} | **{ratio:.2f}×** (rounds {min(per):.2f}–{max(per):.2f}) |", file=out)
    out.flush()


def median_rate(python, env, setup, op, work, repeats=7):
    """`work / median seconds of op` over `repeats` runs after `setup` (and one untimed `op`), in
    a fresh `python`: a machine figure taken in the same sitting as the benchmark."""
    code = (f"import time, statistics\n{setup}\n{op}\n"
            "t = []\n"
            f"for _ in range({repeats}):\n"
            f"    s = time.perf_counter(); {op}; t.append(time.perf_counter() - s)\n"
            f"print(({work}) / statistics.median(t))\n")
    out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def stream_copy_gb_per_s(python, env):
    """One-thread copy of a 512 MiB float32 array (numpy), in GB/s of bytes copied."""
    return median_rate(python, env, "import numpy as np\na = np.ones(128 * 2**20, np.float32); b = np.empty_like(a)",
                       "np.copyto(b, a)", "a.nbytes / 1e9")


def matmul_gflops(python, env, threads, dtype="float32"):
    """Torch products 2048 × 2048 × 2048 in `dtype` on `threads` threads (MKL / oneDNN),
    GFLOP/s: what this machine's matrix units sustain, the ceiling of any forward pass made of
    products at that precision."""
    return median_rate(python, env, f"import torch\ntorch.set_num_threads({threads})\n"
                       f"a = torch.rand(2048, 2048).to(torch.{dtype}); b = torch.rand(2048, 2048).to(torch.{dtype}); c = a @ b",
                       "torch.mm(a, b, out=c)", "2 * 2048**3 / 1e9", repeats=5)


def copy_gb_per_s(python, env, threads):
    """A torch copy of a 512 MiB float32 tensor on `threads` threads, in GB/s of bytes copied."""
    return median_rate(python, env, f"import torch\ntorch.set_num_threads({threads})\n"
                       "a = torch.ones(128 * 2**20); b = torch.empty_like(a)", "b.copy_(a)", "a.numel() * 4 / 1e9")


def parameter_count(model):
    """Values stored in the folder's safetensors files (from their headers)."""
    total = 0
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            with open(os.path.join(model, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for key, entry in header.items():
                if key != "__metadata__":
                    count = 1
                    for n in entry["shape"]:
                        count *= n
                    total += count
    return total


def forward_flops_per_token(model, seq, head_rows):
    """Multiply-adds × 2 per token of a causal forward over `seq` tokens of a LLaMA-shaped config
    (q/k/v/o, gated MLP, the head): every block linear, attention's two products over the
    (seq + 1) / 2 keys a position sees on average, and the head for `head_rows` of the `seq`
    positions (all of them in eval; the last one in a prefill, on both sides)."""
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    d, ff, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    kv = c.get("num_key_value_heads", heads) * hd
    q = heads * hd
    block = 2 * d * (q + 2 * kv) + 2 * q * d + 3 * 2 * d * ff
    attention = 2 * 2 * q * (seq + 1) / 2
    return layers * (block + attention) + 2 * d * vocab * head_rows / seq


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--disp", required=True, help="the disp release binary")
    ap.add_argument("--python", required=True, help="python with torch + transformers")
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--text", default="data/heldout/persuasion.txt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--search-steps", type=int, default=3, help="timed steps per round (after one warm-up)")
    ap.add_argument("--compute", default="f32", choices=["f32", "bf16"], help="disp's --compute for eval and prefill/decode")
    ap.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="PyTorch's model dtype for eval and prefill/decode")
    ap.add_argument("--only", default="eval,speed,search", help="comma-separated subset of eval,speed,search")
    args = ap.parse_args()
    only = set(args.only.split(","))

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), RUST_LOG="warn", TOKENIZERS_PARALLELISM="false")
    py = lambda script, *rest: [args.python, os.path.join(HERE, script), *rest]  # noqa: E731
    t = str(args.threads)
    rows = {}  # name -> (disp values, torch values, unit, higher_is_better)

    def add(name, unit, higher, d, p):
        r = rows.setdefault(name, ([], [], unit, higher))
        r[0].append(d)
        r[1].append(p)

    load = os.getloadavg()[0]
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        if "eval" in only:
            d = run_json([args.disp, "eval", "ppl", "--model", args.model, "--text", args.text, "--seq-len", "512",
                          "--max-windows", str(args.windows), "--compute", args.compute, "--json"], env)
            p = run_json(py("hf_ppl.py", args.model, args.text, "--seq-len", "512", "--max-windows", str(args.windows),
                            "--threads", t, "--dtype", args.torch_dtype, "--json"), env)
            add(f"eval ppl, {args.windows} × 512 tokens", "tokens/s", True, d["tokens_per_second"], p["tokens_per_second"])
            rows.setdefault("_ppl", ([], [], "", True))[0].append((d["perplexity"], p["perplexity"]))
        if "speed" in only:
            d = run_json([args.disp, "bench", "--model", args.model, "--prompt-tokens", "512", "--decode-tokens", "64",
                          "--repetitions", "3", "--compute", args.compute, "--json"], env)["models"][0]
            p = run_json(py("hf_speed.py", "--model", args.model, "--prompt-tokens", "512", "--decode-tokens", "64",
                            "--repetitions", "3", "--threads", t, "--dtype", args.torch_dtype, "--json"), env)
            add("prefill 512 tokens", "tokens/s", True, d["prefill_tokens_per_second"], p["prefill_tokens_per_second"])
            add("decode 64 tokens after 512", "tokens/s", True, d["decode_tokens_per_second"], p["decode_tokens_per_second"])
        if "search" in only:
            n = str(args.search_steps)
            d = run_json([args.disp, "bench", "--model", args.model, "--search-steps", n, "--seq-len", "512", "--json"], env)
            p = run_json(py("hf_search_step.py", "--model", args.model, "--steps", n, "--seq-len", "512", "--threads", t, "--json"), env)
            add("search step, seq 512 (five sites)", "s/step", False, d["median"]["total"], p["median_s"])

        if "eval" in only or "speed" in only:
            # This machine's matmul rate in the same round: a shared VM's speed drifts, so each
            # round's figures are set against its own ceiling.
            # Each side against the ceiling of its own precision.
            disp_dtype = "bfloat16" if args.compute == "bf16" else "float32"
            peaks = {dtype: matmul_gflops(args.python, env, args.threads, dtype) for dtype in {disp_dtype, args.torch_dtype}}
            peak = rows.setdefault("_peak", ([], [], "", True))
            peak[0].append(peaks[disp_dtype])
            peak[1].append(peaks[args.torch_dtype])

        # The table so far, so that an interrupted run still leaves its rounds.
        print_table(rows, sys.stderr)

    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{args.threads} threads, {args.rounds} rounds alternating, load average at start {load:.2f}; "
          f"disp --compute {args.compute}, PyTorch {args.torch_dtype} (eval, prefill, decode)\n")
    print_table(rows, sys.stdout)
    if "speed" in only:
        bandwidth = stream_copy_gb_per_s(args.python, env)
        # The bytes disp's decode reads per token: every weight once, at its compute precision.
        weight_bytes = parameter_count(args.model) * (2 if args.compute == "bf16" else 4)
        floor = bandwidth * 1e9 / weight_bytes
        decode = statistics.median(rows["decode 64 tokens after 512"][0])
        print(f"\nmemory bandwidth (one-thread stream copy of 512 MiB, bytes copied / s): {bandwidth:.1f} GB/s; "
              f"weights {weight_bytes / 1e6:.0f} MB read once per token → decode floor {floor:.1f} tokens/s; "
              f"disp decode = {decode / floor:.0%} of it")
        both = copy_gb_per_s(args.python, env, args.threads)
        print(f"memory bandwidth with {args.threads} threads (torch copy of 512 MiB): {both:.1f} GB/s → decode floor "
              f"{both * 1e9 / weight_bytes:.1f} tokens/s; disp decode = {decode / (both * 1e9 / weight_bytes):.0%} of it")
    if "_peak" in rows:
        # The compute ceiling: no forward made of these products runs faster than the machine's
        # matmul rate, so a ratio against PyTorch is bounded by how far below it PyTorch runs.
        disp_peaks, torch_peaks = rows["_peak"][:2]
        work_per_token = {"eval ppl, %d × 512 tokens" % args.windows: forward_flops_per_token(args.model, 512, 512) / 1e9,
                     "prefill 512 tokens": forward_flops_per_token(args.model, 512, 1) / 1e9}
        print(f"\ncompute ceiling (torch 2048³ product, {args.threads} threads, each round): {statistics.median(disp_peaks):.0f} GFLOP/s "
              f"at disp's precision, {statistics.median(torch_peaks):.0f} at PyTorch's; a forward over 512 tokens is "
              + ", ".join(f"{work * 1e3:.0f} MFLOP per token in {name.split(',')[0]}" for name, work in work_per_token.items()))
        for name, per_token in work_per_token.items():
            if name in rows:
                d, p = ([v * per_token / c for v, c in zip(values, peaks)] for values, peaks in zip(rows[name][:2], (disp_peaks, torch_peaks)))
                dm, pm = statistics.median(d), statistics.median(p)
                need = 1.5 * statistics.median(rows[name][1]) * per_token / statistics.median(disp_peaks)
                print(f"  {name}: disp at {dm:.0%} of its ceiling, PyTorch at {pm:.0%} of its own (medians over rounds); "
                      f"1.5× PyTorch would be {need:.0%} of disp's")
    if "_ppl" in rows:
        dp, pp = rows["_ppl"][0][0]
        print(f"\nperplexity: disp {dp:.4f}, PyTorch {pp:.4f}")


if __name__ == "__main__":
    main()
