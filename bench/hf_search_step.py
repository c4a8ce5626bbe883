#!/usr/bin/env python3
"""One DISP-LLM search step in PyTorch, doing the same work as `disp bench --search-steps`.

Usage (repo root, fixtures venv):
    .venv-fixtures/bin/python bench/hf_search_step.py [--model models/smollm2-135m-instruct]
        [--seq-len 512] [--steps 5] [--threads 2] [--json]

The step, as disp's `Searcher::step` (crates/disp-train/src/search.rs):
  * the model is frozen (no parameter requires grad), float32, batch 1, random token ids
    (seed 0; the work does not depend on their values);
  * the hypernetwork: fixed N(0,1) inputs [1, 5·L, 32] → bidirectional GRU (hidden 64) →
    LayerNorm(128) → GELU → one bias-free linear per (layer, site), stacked per site
    ([L, 128, width]) → gate logits per site [L, width];
  * Gumbel-sigmoid gates: soft = sigmoid((logit + logistic noise + 3) / 0.4); hard = soft > 0.5;
    straight-through = hard − soft.detach() + soft;
  * gates at all five sites of every block: S1 multiplies the attention input (output of
    input_layernorm), S2 the attention output (o_proj output) before the residual add, S3 the
    MLP input (post_attention_layernorm output), S4 the MLP intermediate (down_proj input),
    S5 the MLP output (down_proj output);
  * loss = next-token cross-entropy + λ·|log(P(straight-through gates) / target)| with the
    block-linear parameter count P, λ = 6, target 70 % of the dense block parameters;
  * backward to the hypernetwork, one AdamW step (lr 1e-3, weight decay 0.05).
Prints the median step time over --steps after one warm-up, and the peak RSS.
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
    ap.add_argument("--model", default="models/smollm2-135m-instruct", help="HF folder (LLaMA-like: q/k/v/o, gate/up/down)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda: bench/gpu.sh)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the frozen model's dtype")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(args.model, args.dtype)
    dev = torch.device(args.device)
    model.to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    layers = model.model.layers
    n_layers, d, d_ff = len(layers), cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q_dim, kv_dim = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    widths = [d, d, d, d_ff, d]

    class HyperNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(32, 64, batch_first=True, bidirectional=True)
            self.norm = nn.LayerNorm(128)
            self.heads = nn.ParameterList([nn.Parameter(torch.empty(n_layers, 128, w).uniform_(-128 ** -0.5, 128 ** -0.5)) for w in widths])

        def forward(self, inputs):
            h, _ = self.gru(inputs)
            h = F.gelu(self.norm(h)).reshape(n_layers, 5, 128)
            return [torch.bmm(h[:, s : s + 1], self.heads[s]).reshape(n_layers, widths[s]) for s in range(5)]

    net = HyperNet().to(dev)
    inputs = torch.randn(1, 5 * n_layers, 32).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    dense_block = n_layers * (d * (q_dim + 2 * kv_dim) + q_dim * d + 3 * d * d_ff)
    target = 0.7 * dense_block

    soft = [None] * 5  # this step's soft gates per site, [L, width]

    def out_hook(site, i):
        return lambda _m, _inp, out: out * soft[site][i]

    def pre_hook(site, i):
        return lambda _m, inp: (inp[0] * soft[site][i],)

    for i, layer in enumerate(layers):
        layer.input_layernorm.register_forward_hook(out_hook(0, i))
        layer.self_attn.o_proj.register_forward_hook(out_hook(1, i))
        layer.post_attention_layernorm.register_forward_hook(out_hook(2, i))
        layer.mlp.down_proj.register_forward_pre_hook(pre_hook(3, i))
        layer.mlp.down_proj.register_forward_hook(out_hook(4, i))

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (1, args.seq_len), generator=gen).to(dev)
    act_dtype = getattr(torch, args.dtype)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = net(inputs)
        straight = []
        for s in range(5):
            u = torch.rand(logits[s].shape, generator=gen).clamp(1e-6, 1 - 1e-6).to(dev)
            g = torch.sigmoid((logits[s] + torch.log(u) - torch.log1p(-u) + 3.0) / 0.4)
            soft[s] = g.to(act_dtype)
            hard = (g.detach() > 0.5).float()
            straight.append(hard - g.detach() + g)
        s1, s2, s3, s4, s5 = (t.sum(1) for t in straight)
        params = (s1 * (q_dim + 2 * kv_dim) + s2 * q_dim + 2 * s3 * s4 + s4 * s5).sum()
        reg = 6.0 * torch.log(params / target).abs()
        out = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(out[0, :-1].float(), x[0, 1:])
        (loss + reg).backward()
        opt.step()
        return loss.item()

    times = []
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        print(f"{'warm-up' if s == 0 else f'step {s}'}: {dt:.3f}s loss {loss:.4f}", file=sys.stderr, flush=True)
        if s > 0:
            times.append(dt)
    report = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "steps": len(times),
              "seq_len": args.seq_len, "threads": args.threads, "torch": torch.__version__, "peak_rss_mib": peak_rss_mib(),
              "device": args.device, "dtype": args.dtype}
    if dev.type == "cuda":
        report["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.json:
        print(json.dumps(report))
    else:
        print(f"step time: median {report['median_s']:.3f}s min {report['min_s']:.3f}s max {report['max_s']:.3f}s "
              f"over {len(times)} steps; peak RSS {report['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
