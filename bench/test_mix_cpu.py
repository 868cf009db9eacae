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


HEAD = ("head.weight", "head.bias")


def vit_b16_arena(K, device="cpu", dtype=torch.float32):
    """K random ViT-B/16-shaped experts packed as an arena [K, N], head last: (arena, bounds of
    the two groups (encoder, head), the experts as per-parameter dicts in arena order)."""
    shapes = vit_b16_shapes()
    order = [k for k in shapes if k not in HEAD] + list(HEAD)
    sizes = [torch.Size(shapes[k]).numel() for k in order]
    arena = torch.randn(K, sum(sizes), device=device, dtype=dtype)
    experts = [{k: piece.view(shapes[k]).clone() for k, piece in zip(order, row.split(sizes))}
               for row in arena]
    return arena, [0, sum(sizes) - sum(sizes[-len(HEAD):]), sum(sizes)], experts


def per_parameter_loops(experts, weights):
    """The two ways people mix state dicts key by key, given weights[group][k] as Python floats:
    (the careful in-place loop, the one-liner sum, the in-place loop's output dicts)."""
    K = len(experts)
    merged = {k: torch.empty_like(v) for k, v in experts[0].items()}

    def loop_in_place():
        for k in merged:
            c = weights[1 if k in HEAD else 0]
            merged[k].copy_(experts[0][k]).mul_(c[0])
            for i in range(1, K):
                merged[k].add_(experts[i][k], alpha=c[i])

    def loop_sum():
        return {k: sum(weights[1 if k in HEAD else 0][i] * experts[i][k] for i in range(K))
                for k in merged}
    return loop_in_place, loop_sum, merged


def test_arena_mix_against_per_parameter_loops():
    K = 5
    arena, bounds, experts = vit_b16_arena(K)
    N = arena.shape[1]
    coeffs = torch.softmax(torch.randn(2, K), dim=1)
    loop_in_place, loop_sum, merged = per_parameter_loops(experts, coeffs.tolist())
    out = torch.empty(N)

    def arena_mix():
        ops.mix(arena, coeffs, bounds, out=out, backend="torch")

    t_arena, t_loop = interleaved(arena_mix, loop_in_place, rounds=5)
    _, t_sum = interleaved(arena_mix, loop_sum, rounds=3)
    loop_in_place()
    flat = torch.cat([m.flatten() for m in merged.values()])
    assert torch.allclose(out, flat, rtol=1e-5, atol=1e-5)
    row = {"params": N, "K": K, "arena_mix_s": t_arena, "loop_in_place_s": t_loop,
           "loop_sum_s": t_sum, "ratio_vs_in_place": t_loop / t_arena,
           "ratio_vs_sum": t_sum / t_arena,
           "arena_GBps": (K + 1) * N * 4 / t_arena / 1e9}
    print("\n", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    record("mix_cpu", [row], "cpu")
