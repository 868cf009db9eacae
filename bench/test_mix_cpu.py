"""ops.mix's torch path over a flat arena against per-parameter torch loops, on the CPU, same
process, same inputs: a ViT-B/16-shaped state dict (86M parameters), K = 5 experts, two
groups (encoder, head), fp32.

    python -m pytest bench/test_mix_cpu.py -s
"""
import torch

from scoremerge import ops

from harness import interleaved, record
from workloads import per_parameter_loops, vit_b16_arena


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
