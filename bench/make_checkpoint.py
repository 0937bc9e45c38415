"""Writes a random Llama checkpoint (HF folder: config.json + model.safetensors, bf16) whose
blocks have the Llama-2-70B shape, for timing a real `server` without a download.

Usage: python3 bench/make_checkpoint.py OUT_DIR [--layers 2] [--vocab 1024]
The small vocabulary keeps the client's embeddings and head negligible; the blocks are full size
(1.71 GB each). Weights are N(0, 0.02), norms 1, generated on the GPU when there is one.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=2)
p.add_argument("--vocab", type=int, default=1024)
args = p.parse_args()
hidden, heads, kv, inter, hd = 8192, 64, 8, 28672, 128
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
    "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
    "num_hidden_layers": args.layers, "vocab_size": args.vocab, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=dev).manual_seed(0)


def rand(*shape):
    return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()


def ones(n):
    return torch.ones(n, dtype=torch.bfloat16)


t = {"model.embed_tokens.weight": rand(args.vocab, hidden), "model.norm.weight": ones(hidden),
     "lm_head.weight": rand(args.vocab, hidden)}
for i in range(args.layers):
    b = f"model.layers.{i}."
    t[b + "input_layernorm.weight"] = ones(hidden)
    t[b + "post_attention_layernorm.weight"] = ones(hidden)
    t[b + "self_attn.q_proj.weight"] = rand(heads * hd, hidden)
    t[b + "self_attn.k_proj.weight"] = rand(kv * hd, hidden)
    t[b + "self_attn.v_proj.weight"] = rand(kv * hd, hidden)
    t[b + "self_attn.o_proj.weight"] = rand(hidden, heads * hd)
    t[b + "mlp.gate_proj.weight"] = rand(inter, hidden)
    t[b + "mlp.up_proj.weight"] = rand(inter, hidden)
    t[b + "mlp.down_proj.weight"] = rand(hidden, inter)
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
save_file(t, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
