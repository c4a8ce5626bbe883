#!/usr/bin/env python3
"""Prefill and decode tokens/s with HF transformers (PyTorch, CPU), as `disp bench` measures them.

Usage (repo root, fixtures venv):
    .venv-fixtures/bin/python bench/hf_speed.py [--model models/smollm2-135m-instruct]
        [--prompt-tokens 512] [--decode-tokens 64] [--repetitions 5] [--threads 2] [--json]

Same prompt ids as disp (`crates/disp-eval/src/speed.rs`: (i·2654435761 + 17) mod vocab),
batch 1, float32. Prefill: one forward over the prompt filling the KV cache, then the argmax of
the last position. Decode: `--decode-tokens` greedy steps, one token each against the cache.
Medians over `--repetitions` after one warm-up.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _hf_common import load_model_and_tokenizer, peak_rss_mib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, args.dtype)
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 2654435761 + 17) % vocab for i in range(args.prompt_tokens)]], dtype=torch.long)

    def once():
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            nxt = out.logits[0, -1].argmax().item()
            prefill = time.perf_counter() - t0
            past = out.past_key_values
            t0 = time.perf_counter()
            for _ in range(args.decode_tokens):
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[0, -1].argmax().item()
            return prefill, time.perf_counter() - t0

    once()
    runs = [once() for _ in range(args.repetitions)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    report = {"prefill_tokens_per_second": args.prompt_tokens / prefill, "decode_tokens_per_second": args.decode_tokens / decode,
              "prefill_seconds": [r[0] for r in runs], "decode_seconds": [r[1] for r in runs], "peak_rss_mib": peak_rss_mib()}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"prefill {report['prefill_tokens_per_second']:.1f} tok/s, decode {report['decode_tokens_per_second']:.1f} tok/s")


if __name__ == "__main__":
    main()
