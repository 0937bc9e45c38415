"""PyTorch + transformers eager reference for the GPU benchmark table (BENCHMARKS.md).

Prints one JSON object a line, the same fields as `corolla bench --json`:
- a Llama-70B-shaped `LlamaDecoderLayer` (hidden 8192, 64 heads, 8 KV heads, MLP 28672) in
  bf16: one decode step after 512 and 4096 cached tokens, and a prefill of 2048 tokens;
- a Llama-3-8B-shaped `LlamaForCausalLM`, greedy decode tokens/s after the first token;
- the device-to-device copy rate, from which the bandwidth limit of a block is derived.

Random weights (no download); eager attention; every step waits for the GPU, as corolla's do.
Usage: python3 bench/torch_reference.py [--iters 20] [--warmup 3] [--model-tokens 64]
"""
import argparse
import json
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

p = argparse.ArgumentParser()
p.add_argument("--iters", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--cached", default="512,4096")
p.add_argument("--prefill", type=int, default=2048)
p.add_argument("--model-tokens", type=int, default=64)
args = p.parse_args()
dev = torch.device("cuda")
bf16 = torch.bfloat16
common = {"engine": "pytorch-eager", "torch": torch.__version__, "transformers": transformers.__version__,
          "device": torch.cuda.get_device_name(0), "dtype": "bf16"}


def emit(**kw):
    print(json.dumps({**common, **kw}), flush=True)


def sync_time(fn, iters):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


# Copy rate, bytes read plus bytes written per second: the bandwidth limit of reading N bytes of
# weights is N / rate (as the issue takes it: 1.71 GB at 4.27 TB/s is 0.40 ms).
a = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
sec = sync_time(lambda: b.copy_(a), 10)
copy_rate = 2 * a.numel() / sec
emit(what="copy", bytes_per_s=copy_rate)
del a, b


def llama(hidden, heads, kv, inter, layers, vocab):
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return cfg


torch.set_default_dtype(bf16)
with torch.no_grad():
    cfg = llama(8192, 64, 8, 28672, 1, 128256)
    with torch.device(dev):
        layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
        rotary = LlamaRotaryEmbedding(cfg)
    block_bytes = sum(t.numel() * t.element_size() for t in layer.parameters())
    emit(what="load", shape="llama-70b", weight_bytes_per_block=block_bytes,
         limit_ms_per_block=block_bytes / copy_rate * 1e3)
    hd, nkv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads

    for cached in [int(c) for c in args.cached.split(",")]:
        from transformers.cache_utils import DynamicCache
        try:
            cache = DynamicCache(config=cfg)
        except TypeError:
            cache = DynamicCache()
        k = torch.randn(1, nkv, cached, hd, device=dev)
        cache.update(k, torch.randn_like(k), 0)
        x = torch.randn(1, 1, cfg.hidden_size, device=dev)
        state = {"pos": cached}

        def step():
            pos = torch.tensor([[state["pos"]]], device=dev)
            cos_sin = rotary(x, pos)
            layer(x, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                  cache_position=pos[0], position_embeddings=cos_sin)
            state["pos"] += 1

        t = time.perf_counter()
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        warm = (time.perf_counter() - t) * 1e3
        emit(what="decode", shape="llama-70b", cached=cached, iters=args.iters,
             ms_per_block=sync_time(step, args.iters) * 1e3, warmup_ms=warm)

    n = args.prefill
    x = torch.randn(1, n, cfg.hidden_size, device=dev)
    pos = torch.arange(n, device=dev)[None]
    mask = torch.full((n, n), torch.finfo(bf16).min, device=dev).triu(1)[None, None]
    cos_sin = rotary(x, pos)

    def prefill():
        layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)

    t = time.perf_counter()
    for _ in range(args.warmup):
        prefill()
    torch.cuda.synchronize()
    warm = (time.perf_counter() - t) * 1e3
    emit(what="prefill", shape="llama-70b", tokens=n, iters=args.iters,
         ms_per_block=sync_time(prefill, args.iters) * 1e3, warmup_ms=warm)
    del layer, x, mask
    torch.cuda.empty_cache()

    if args.model_tokens > 0:
        cfg = llama(4096, 32, 8, 14336, 32, 128256)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).eval()
        model_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        prompt = torch.tensor([[(i * 7919 + 3) % cfg.vocab_size for i in range(16)]], device=dev)

        def gen(n):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        warm = gen(4) * 1e3
        first = gen(1)
        total = gen(args.model_tokens)
        emit(what="model_decode", shape="llama-8b", layers=32, prompt=16, tokens=args.model_tokens,
             tokens_per_s=(args.model_tokens - 1) / (total - first), warmup_ms=warm,
             limit_tokens_per_s=copy_rate / model_bytes)
