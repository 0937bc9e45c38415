"""Writes a random sharded Llama checkpoint (HF folder: config.json, model-XXXXX-of-YYYYY.safetensors
shards and model.safetensors.index.json, bf16) with many blocks, for measuring what a server
reads from storage at start-up (bench/fingerprint_io.sh). Python's standard library only: no
torch or numpy (bench/make_checkpoint.py, which writes one file of 70B-shaped blocks, needs
torch).

Usage: python3 bench/make_sharded_checkpoint.py OUT_DIR [--layers 80] [--hidden 1280]
       [--intermediate 5120] [--heads 16] [--kv-heads 4] [--vocab 1024] [--blocks-per-shard 5]

The defaults give 80 blocks of 47.5 MB (3.8 GB) in 16 shards of 5 blocks, the embeddings in
the first shard and the final norm and LM head in the last, as transformers' `save_pretrained`
lays a Llama out. Values are N(0, 0.02) (norms 1): a 4 MiB pool of them, each tensor read from
it at its own offset, so tensors differ from each other while the writer stays disk-bound.
"""
import argparse
import json
import os
import random
import struct

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=80)
p.add_argument("--hidden", type=int, default=1280)
p.add_argument("--intermediate", type=int, default=5120)
p.add_argument("--heads", type=int, default=16)
p.add_argument("--kv-heads", type=int, default=4)
p.add_argument("--vocab", type=int, default=1024)
p.add_argument("--blocks-per-shard", type=int, default=5)
args = p.parse_args()
hidden, heads, kv, inter = args.hidden, args.heads, args.kv_heads, args.intermediate
hd = hidden // heads

rng = random.Random(0)
POOL = b"".join(struct.pack("<f", rng.gauss(0.0, 0.02))[2:] for _ in range(2 << 20))  # bf16: top half
ONE = struct.pack("<f", 1.0)[2:]


def tensors_of_block(i):
    b = f"model.layers.{i}."
    return [
        (b + "input_layernorm.weight", [hidden], "ones"),
        (b + "post_attention_layernorm.weight", [hidden], "ones"),
        (b + "self_attn.q_proj.weight", [heads * hd, hidden], "rand"),
        (b + "self_attn.k_proj.weight", [kv * hd, hidden], "rand"),
        (b + "self_attn.v_proj.weight", [kv * hd, hidden], "rand"),
        (b + "self_attn.o_proj.weight", [hidden, heads * hd], "rand"),
        (b + "mlp.gate_proj.weight", [inter, hidden], "rand"),
        (b + "mlp.up_proj.weight", [inter, hidden], "rand"),
        (b + "mlp.down_proj.weight", [hidden, inter], "rand"),
    ]


blocks = list(range(args.layers))
groups = [blocks[s:s + args.blocks_per_shard] for s in range(0, len(blocks), args.blocks_per_shard)]
shards = []
for g, group in enumerate(groups):
    tensors = [t for i in group for t in tensors_of_block(i)]
    if g == 0:
        tensors.insert(0, ("model.embed_tokens.weight", [args.vocab, hidden], "rand"))
    if g == len(groups) - 1:
        tensors += [("model.norm.weight", [hidden], "ones"), ("lm_head.weight", [args.vocab, hidden], "rand")]
    shards.append(tensors)

config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
    "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
    "num_hidden_layers": args.layers, "vocab_size": args.vocab, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "config.json"), "w") as f:
    json.dump(config, f, indent=1)


def write_data(f, kind, n_bytes, seed):
    if kind == "ones":
        f.write(ONE * (n_bytes // 2))
        return
    at = (seed * 7919 * 2) % len(POOL)
    while n_bytes > 0:
        piece = POOL[at:at + n_bytes]
        f.write(piece)
        n_bytes -= len(piece)
        at = 0


weight_map, total, seed = {}, 0, 0
for s, tensors in enumerate(shards):
    name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for tname, shape, _ in tensors:
        n = 2
        for d in shape:
            n *= d
        header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
        weight_map[tname] = name
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section 8-aligned, as safetensors writes it
    with open(os.path.join(args.out, name), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for tname, shape, kind in tensors:
            seed += 1
            start, end = header[tname]["data_offsets"]
            write_data(f, kind, end - start, seed)
    total += offset
    print(f"{name}: {len(tensors)} tensors, {offset / 1e6:.1f} MB", flush=True)
with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
print(f"{args.out}: {args.layers} blocks, {total / 1e9:.2f} GB in {len(shards)} shards")
