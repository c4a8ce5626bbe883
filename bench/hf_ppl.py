#!/usr/bin/env python3
"""Reference perplexity with Hugging Face transformers (PyTorch, CPU).

Usage (from the repo root, with the fixtures venv, see tests/fixtures/README.md):
    .venv-fixtures/bin/python bench/hf_ppl.py MODEL TEXT_FILE [--seq-len 512] [--max-windows N]

MODEL is an HF folder (config.json + safetensors + tokenizer files) or a .gguf
file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf; the special value `smollm2` finds
or fetches it, see bench/_hf_common.py).

Protocol (the Rust `disp` evaluator should match it):
  * the whole file is read as UTF-8 and tokenised once, WITHOUT special tokens
    (no BOS/EOS inserted; `add_special_tokens=False`);
  * the token stream is cut into non-overlapping windows of --seq-len tokens,
    the last partial window is dropped, only the first --max-windows are used;
  * each window is one independent sequence (batch 1, no attention mask); every
    position but the last predicts the next token, so a window contributes
    seq_len - 1 predicted tokens;
  * perplexity = exp(sum of NLL / number of predicted tokens), NLL from a float32
    log-softmax.
tokens/s counts the forward-pass input tokens (windows * seq_len) over the time
spent in forward + loss.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _hf_common import find_smollm2_gguf, load_model_and_tokenizer, peak_rss_mib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF model folder, a .gguf file, or 'smollm2'")
    ap.add_argument("text", help="UTF-8 text file")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda: bench/gpu.sh)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line (perplexity, tokens/s, peak RSS)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    path = find_smollm2_gguf() if args.model == "smollm2" else args.model

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(path, args.dtype)
    model.to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t_load = time.perf_counter() - t0

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    t_tok = time.perf_counter() - t0
    n_tokens = len(ids)
    n_windows = n_tokens // args.seq_len
    if args.max_windows is not None:
        n_windows = min(n_windows, args.max_windows)
    if n_windows == 0:
        sys.exit(f"text has {n_tokens} tokens, fewer than one window of {args.seq_len}")
    ids = torch.tensor(ids[: n_windows * args.seq_len], dtype=torch.long).view(n_windows, args.seq_len)

    total_nll = 0.0
    n_pred = 0
    t_fwd = 0.0
    with torch.inference_mode():
        for w in range(n_windows):
            x = ids[w : w + 1].to(args.device)
            sync()
            t0 = time.perf_counter()
            logits = model(input_ids=x, use_cache=False).logits
            nll = F.cross_entropy(
                logits[0, :-1].float(), x[0, 1:], reduction="sum"
            ).item()  # waits for the device
            t_fwd += time.perf_counter() - t0
            total_nll += nll
            n_pred += args.seq_len - 1
            print(f"window {w + 1}/{n_windows}: running ppl {math.exp(total_nll / n_pred):.4f}",
                  file=sys.stderr, flush=True)

    ppl = math.exp(total_nll / n_pred)
    print(f"model: {path}")
    print(f"text: {args.text} ({len(text)} chars, {n_tokens} tokens, no special tokens)")
    print(f"seq_len: {args.seq_len}  windows: {n_windows}  predicted tokens: {n_pred}")
    print(f"mean NLL: {total_nll / n_pred:.6f}")
    print(f"perplexity: {ppl:.4f}")
    print(f"tokens/s (forward): {n_windows * args.seq_len / t_fwd:.1f}  "
          f"(forward {t_fwd:.2f}s, tokenise {t_tok:.2f}s, load {t_load:.2f}s, threads {args.threads})")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    if args.json:
        import json

        print(json.dumps({"perplexity": ppl, "tokens_per_second": n_windows * args.seq_len / t_fwd, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
