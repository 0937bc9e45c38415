"""The strong PyTorch reference for batched decode (BENCHMARKS.md, issue 16): a span of
Llama-2-70B-shaped blocks (hidden 8192, 64 heads, 8 KV heads, MLP 28672, bf16, random weights)
written by hand (RMSNorm, fused q/k/v, RoPE, `scaled_dot_product_attention` over a static KV
cache, gated MLP), one decode step of N sessions with `--cached` tokens each, captured once as
a `torch.cuda.CUDAGraph` and replayed, each replay waited for (as a server's reply is).

Prints one JSON object a line, the fields of `corolla bench --sessions --json`:
  {"engine": "pytorch-sdpa-cudagraph", "what": "batched_decode", "sessions": N,
   "batched_ms_per_step": ..., "batched_tokens_per_s": ...}
Usage: python3 bench/torch_batched.py [--blocks 8] [--cached 512] [--sessions 1,8,32,64]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--blocks", type=int, default=8)
p.add_argument("--cached", type=int, default=512)
p.add_argument("--sessions", default="1,8,32,64")
p.add_argument("--iters", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
args = p.parse_args()
dev = torch.device("cuda")
dt = torch.bfloat16
H, NH, NKV, INTER = 8192, 64, 8, 28672
HD = H // NH
common = {"engine": "pytorch-sdpa-cudagraph", "torch": torch.__version__,
          "device": torch.cuda.get_device_name(0), "dtype": "bf16", "shape": "llama-70b",
          "blocks": args.blocks, "cached": args.cached}


def emit(**kw):
    print(json.dumps({**common, **kw}), flush=True)


def rand(*shape):
    return (torch.randn(*shape, device=dev, dtype=dt) * 0.02)


blocks = [dict(ln1=torch.ones(H, device=dev, dtype=dt), wqkv=rand(H, (NH + 2 * NKV) * HD),
               wo=rand(NH * HD, H), ln2=torch.ones(H, device=dev, dtype=dt), wgu=rand(H, 2 * INTER),
               wd=rand(INTER, H)) for _ in range(args.blocks)]
inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, device=dev, dtype=torch.float32) / HD))


def rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * w


def rope(x, cos, sin):
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def step(x, pos, caches, length):
    """x [n, 1, H]; pos: a 1-element device tensor (every session at the same position)."""
    n = x.shape[0]
    ang = pos.float()[:, None] * inv_freq[None]
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dt)[:, None, None, :]
    sin = torch.cat((ang.sin(), ang.sin()), -1).to(dt)[:, None, None, :]
    visible = (torch.arange(length, device=dev) <= pos)[None, None, None, :]
    for b, (kc, vc) in zip(blocks, caches):
        h = rms(x, b["ln1"]) @ b["wqkv"]
        q, k, v = h.split([NH * HD, NKV * HD, NKV * HD], dim=-1)
        q = rope(q.view(n, 1, NH, HD).transpose(1, 2), cos, sin)
        k = rope(k.view(n, 1, NKV, HD).transpose(1, 2), cos, sin)
        v = v.view(n, 1, NKV, HD).transpose(1, 2)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=visible, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(n, 1, NH * HD) @ b["wo"]
        g, u = (rms(x, b["ln2"]) @ b["wgu"]).chunk(2, dim=-1)
        x = x + (F.silu(g) * u) @ b["wd"]
    return x


with torch.no_grad():
    for n in [int(s) for s in args.sessions.split(",")]:
        length = args.cached + args.warmup + args.iters + 8
        caches = [(torch.randn(n, NKV, length, HD, device=dev, dtype=dt),
                   torch.randn(n, NKV, length, HD, device=dev, dtype=dt)) for _ in blocks]
        x = torch.randn(n, 1, H, device=dev, dtype=dt)
        pos = torch.tensor([args.cached], device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step(x, pos, caches, length)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x, pos, caches, length)
            pos.add_(1)
        pos.fill_(args.cached)
        for _ in range(args.warmup):
            graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.iters):
            graph.replay()
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / args.iters * 1e3
        emit(what="batched_decode", sessions=n, iters=args.iters, batched_ms_per_step=ms,
             batched_tokens_per_s=n * 1e3 / ms)
        del graph, caches, out
        torch.cuda.empty_cache()
