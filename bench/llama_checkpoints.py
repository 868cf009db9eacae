"""Llama-shaped checkpoints for benchmarks and compatibility tests: real Llama key names and a
config.json that transformers (and so mergekit) accepts, random weights, a base and experts
fine-tuned from it by small updates; one model in memory at a time.

    python bench/llama_checkpoints.py OUT_DIR [--layers 4 --hidden 2048 --vocab 32000 --experts 3]
"""
import argparse
import json
from pathlib import Path

import torch

from scoremerge.io import save_state_dict


def llama_config(layers, hidden, intermediate, vocab, heads, dtype):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": intermediate, "vocab_size": vocab,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1,
            "eos_token_id": 2}


def llama_shapes(layers, hidden, intermediate, vocab):
    """{key: shape} in the order transformers writes a Llama checkpoint."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (intermediate, hidden),
                   p + "mlp.up_proj.weight": (intermediate, hidden),
                   p + "mlp.down_proj.weight": (hidden, intermediate),
                   p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def write_llama_family(out, *, layers=4, hidden=2048, intermediate=5632, vocab=32000, heads=16,
                       experts=3, dtype=torch.float32, update=0.01, shard_size="1GB", seed=0):
    """[base folder, expert folders...] under `out`; an existing complete family is reused."""
    out = Path(out)
    shapes = llama_shapes(layers, hidden, intermediate, vocab)
    config = llama_config(layers, hidden, intermediate, vocab, heads, dtype)
    folders = [out / "base"] + [out / f"expert{i}" for i in range(1, experts + 1)]
    for t, folder in enumerate(folders):
        if (folder / "config.json").is_file():
            continue
        g = torch.Generator().manual_seed(seed)             # every model draws the same base
        noise = torch.Generator().manual_seed(seed + 1000 * t)
        state = {}
        for key, shape in shapes.items():
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            if t:
                w += update * 0.02 * torch.randn(shape, generator=noise)
            state[key] = w.to(dtype)
        save_state_dict(state, folder, max_shard_size=shard_size, overwrite=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folders


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=3)
    a = p.parse_args()
    for f in write_llama_family(a.out, layers=a.layers, hidden=a.hidden,
                                intermediate=a.intermediate, vocab=a.vocab, experts=a.experts):
        print(f)


if __name__ == "__main__":
    main()
