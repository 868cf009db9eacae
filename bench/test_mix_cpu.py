"""ops.mix's torch path over a flat arena against per-parameter torch loops, on the CPU, same
process, same inputs (issue 7): a ViT-B/16-shaped state dict (86M parameters), K = 5 experts, two
groups (encoder, head), fp32.

    python -m pytest bench/test_mix_cpu.py -s
"""
import torch

from scoremerge import ops

from harness import interleaved, record


def vit_b16_shapes():
    shapes = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
              "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,)}
    for i in range(12):
        p = f"blocks.{i}."
        shapes |= {p + "norm1.weight": (768,), p + "norm1.bias": (768,),
                   p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
                   p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,),
                   p + "norm2.weight": (768,), p + "norm2.bias": (768,),
                   p + "mlp.fc1.weight": (3072, 768), p + "mlp.fc1.bias": (3072,),
                   p + "mlp.fc2.weight": (768, 3072), p + "mlp.fc2.bias": (768,)}
    return shapes | {"norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768),
                     "head.bias": (1000,)}


def test_arena_mix_against_per_parameter_loops():
    K = 5
    shapes = vit_b16_shapes()
    sizes = {k: torch.Size(s).numel() for k, s in shapes.items()}
    N = sum(sizes.values())
    head = {"head.weight", "head.bias"}
    order = [k for k in shapes if k not in head] + [k for k in shapes if k in head]
    arena = torch.randn(K, N)
    offsets, at = {}, 0
    for k in order:
        offsets[k] = at
        at += sizes[k]
    bounds = [0, offsets["head.weight"], N]
    experts = [{k: arena[i, offsets[k]:offsets[k] + sizes[k]].view(shapes[k]).clone()
                for k in order} for i in range(K)]
    coeffs = torch.softmax(torch.randn(2, K), dim=1)
    out = torch.empty(N)
    merged = {k: torch.empty(shapes[k]) for k in order}

    def arena_mix():
        ops.mix(arena, coeffs, bounds, out=out, backend="torch")

    def loop_in_place():                           # the careful per-parameter loop
        for k in order:
            c = coeffs[1 if k in head else 0]
            merged[k].copy_(experts[0][k]).mul_(c[0])
            for i in range(1, K):
                merged[k].add_(experts[i][k], alpha=c[i].item())

    def loop_sum():                                # the common one-liner
        return {k: sum(coeffs[1 if k in head else 0][i] * experts[i][k] for i in range(K))
                for k in order}

    t_arena, t_loop = interleaved(arena_mix, loop_in_place, rounds=5)
    _, t_sum = interleaved(arena_mix, loop_sum, rounds=3)
    loop_in_place()
    flat = torch.cat([merged[k].flatten() for k in order])
    assert torch.allclose(out, flat, rtol=1e-5, atol=1e-5)
    row = {"params": N, "K": K, "arena_mix_s": t_arena, "loop_in_place_s": t_loop,
           "loop_sum_s": t_sum, "ratio_vs_in_place": t_loop / t_arena,
           "ratio_vs_sum": t_sum / t_arena,
           "arena_GBps": (K + 1) * N * 4 / t_arena / 1e9}
    print("\n", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    record("mix_cpu", [row], "cpu")
