#!/usr/bin/env python3
"""Time one DISP-LLM-hypernetwork-like training step on SmolLM2-135M with PyTorch (CPU).

Usage (from the repo root, with the fixtures venv, see tests/fixtures/README.md):
    .venv-fixtures/bin/python bench/hf_hyper_step.py [--model smollm2|PATH] [--text FILE]
        [--seq-len 512] [--steps 5] [--threads 2]

What one step does (a stand-in for the cost of a DISP-LLM hypernetwork step):
  * all model weights are frozen (requires_grad False), model in float32;
  * a learnable gate-logit tensor G of shape [n_layers, intermediate] (30 x 1536
    for SmolLM2-135M) is the only trainable parameter;
  * a forward pre-hook on every layer's mlp.down_proj multiplies its input (the
    SwiGLU intermediate activation) by sigmoid(G[layer]);
  * loss = next-token cross-entropy over seq_len-1 positions of one sequence
    (batch 1); backward to G; one AdamW step.
The script runs 1 warm-up step then --steps timed steps and prints the median,
min and max step time and the process's peak RSS.

Input: the first seq_len tokens of --text (no special tokens), or, without
--text, fixed pseudo-random token ids (seed 0).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _hf_common import find_smollm2_gguf, load_model_and_tokenizer, peak_rss_mib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="HF folder, .gguf file, or 'smollm2'")
    ap.add_argument("--text", default=None, help="take the input tokens from this UTF-8 file")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    path = find_smollm2_gguf() if args.model == "smollm2" else args.model
    model, tok = load_model_and_tokenizer(path, "float32")
    for p in model.parameters():
        p.requires_grad_(False)

    layers = model.model.layers
    n_layers = len(layers)
    inter = model.config.intermediate_size
    gate_logits = torch.nn.Parameter(torch.full((n_layers, inter), 3.0))  # sigmoid(3) ~ 0.95

    def make_hook(i):
        def hook(_module, inputs):
            (h,) = inputs
            return (h * torch.sigmoid(gate_logits[i]),)
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    opt = torch.optim.AdamW([gate_logits], lr=args.lr)

    if args.text:
        with open(args.text, encoding="utf-8") as f:
            ids = tok(f.read(), add_special_tokens=False)["input_ids"][: args.seq_len]
        if len(ids) < args.seq_len:
            sys.exit(f"text has only {len(ids)} tokens")
        x = torch.tensor([ids], dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:])
        loss.backward()
        opt.step()
        return loss.item()

    times = []
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        tag = "warm-up" if s == 0 else f"step {s}"
        print(f"{tag}: {dt:.3f}s loss {loss:.4f}", file=sys.stderr, flush=True)
        if s > 0:
            times.append(dt)
    for h in handles:
        h.remove()

    print(f"model: {path} ({n_layers} layers, intermediate {inter}, gates {tuple(gate_logits.shape)})")
    print(f"batch 1, seq_len {args.seq_len}, threads {args.threads}, torch {torch.__version__}")
    print(f"step time: median {statistics.median(times):.3f}s  min {min(times):.3f}s  "
          f"max {max(times):.3f}s  over {len(times)} steps (after 1 warm-up)")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
