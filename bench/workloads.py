"""The workloads the benchmarks share, in one place: ViT-B/16 shapes, low-rank-plus-noise task
vectors, a ViT-B/16-sized flat arena of experts and the per-parameter mixing loops it is measured
against. Benchmarks import these, never one another."""
import torch


VIT_B_BLOCK = {"attn.in_proj_weight": (2304, 768), "attn.in_proj_bias": (2304,),
               "attn.out_proj.weight": (768, 768), "attn.out_proj.bias": (768,),
               "ln_1.weight": (768,), "ln_1.bias": (768,), "ln_2.weight": (768,),
               "ln_2.bias": (768,), "mlp.c_fc.weight": (3072, 768), "mlp.c_fc.bias": (3072,),
               "mlp.c_proj.weight": (768, 3072), "mlp.c_proj.bias": (768,)}
SMALL_BLOCK = {k: tuple(d // 4 for d in s) for k, s in VIT_B_BLOCK.items()}


def task_vectors(shapes, T=3, seed=0):
    """Low-rank-plus-noise task vectors, as fine-tuning updates look (decaying spectra)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        tv = {}
        for key, shape in shapes.items():
            if len(shape) == 2:
                r = min(shape) // 8
                tv[key] = (torch.randn(shape[0], r, generator=g, dtype=torch.float64)
                           @ torch.randn(r, shape[1], generator=g, dtype=torch.float64) / r
                           + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)) * 1e-3
            else:
                tv[key] = 1e-3 * torch.randn(*shape, generator=g, dtype=torch.float64)
        out.append(tv)
    return out


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
