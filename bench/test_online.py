"""OnlineMerger per batch: where the time goes, and what the adaptation costs, then
what each strategy costs per batch.

For each model: the K expert passes (K functional passes, and one vmap pass), the merged model's
forward, and the adaptation itself -- entropies and coefficients (ops.entropy_weights) plus the
mixing of all parameters (ops.mix into the model's flat buffer) -- then a whole merger(x) call.
The overhead is (entropy weights + mixing) / (expert passes + merged forward); the goal on an H200
at ViT-B/16 size, batch 64, K = 5, is at most 15%. CPU: the demo's TinyViT and a ViT-Ti/16-shaped
model at a small batch (ratios only). GPU: ViT-B/16 (86M parameters) at batch 64, fp32 and bf16.

Strategies: a whole merger(x) call under each of the demo's online rows (ONLINE_VARIANTS, the
default among them; calibration records made on the batch itself), with the merged forwards it
ran, against the K expert passes alone, on a batch whose two halves come from two input
distributions (so grouping forms groups). Rows go to the same results file.

    python -m pytest bench/test_online.py -s               # CPU rows: -k cpu
"""
import os

import pytest
import torch

from scoremerge import OnlineMerger, ops
from scoremerge.demo.model import TinyViT, ViTConfig
from scoremerge.demo.online import DEFAULT, ONLINE_VARIANTS, RECORDS
from scoremerge.online import calibration_record

from harness import best_time, ceilings, record

DIGITS = ViTConfig()
VIT_TI16 = ViTConfig(image=224, patch=16, dim=192, depth=12, heads=3, mlp=768, classes=1000)
VIT_B16 = ViTConfig(image=224, patch=16, dim=768, depth=12, heads=12, mlp=3072, classes=1000)
K = 5
# Recorded with the strategy rows (the CPU ones; GPU rows: -k cuda), with the thread setting.
COMMAND = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ
           else "") + "python -m pytest bench/test_online.py -s -k cpu"

CASES = [("cpu", "digits TinyViT", DIGITS, 64, torch.float32),
         ("cpu", "ViT-Ti/16 shape", VIT_TI16, 8, torch.float32),
         ("cuda", "ViT-B/16 shape", VIT_B16, 64, torch.float32),
         ("cuda", "ViT-B/16 shape", VIT_B16, 64, torch.bfloat16)]
_ROWS = []
STRATEGY_CASES = [("cpu", "digits TinyViT", DIGITS, 64, torch.float32),
                  ("cpu", "ViT-Ti/16 shape", VIT_TI16, 8, torch.float32),
                  ("cuda", "ViT-B/16 shape", VIT_B16, 64, torch.float32),
                  ("cuda", "ViT-B/16 shape", VIT_B16, 64, torch.bfloat16)]


def experts_for(config, dtype, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = []
    for k in range(K):
        torch.manual_seed(k)
        out.append({n: v.to(device, dtype) for n, v in TinyViT(config).state_dict().items()})
    return out


def cases(rows):
    return pytest.mark.parametrize("device, name, config, batch, dtype", rows,
                                   ids=[f"{c[0]}-{c[1]}-{str(c[4])[6:]}" for c in rows])


@cases(CASES)
def test_online_step_breakdown(device, name, config, batch, dtype):
    experts = experts_for(config, dtype, device)
    x = torch.rand(batch, 1, config.image, config.image, device=device, dtype=dtype)
    rounds = 10 if device == "cuda" else 5
    row = {"model": name, "device": device, "dtype": str(dtype)[6:], "batch": batch, "K": K}
    mergers = {p: OnlineMerger(TinyViT(config).to(device, dtype), experts, expert_passes=p,
                               groups=1)            # one merged model: the paper's reading
               for p in ("loop", "vmap")}
    merger = mergers["loop"]
    row["params"] = merger.arena.numel
    with torch.no_grad():
        # _expert_logits is the merger's own step 1 (a private method, timed here on purpose).
        for passes, m in mergers.items():
            row[f"expert_passes_{passes}_ms"] = 1e3 * best_time(
                lambda: m._expert_logits(x), rounds=rounds, device=device)
        logits = merger._expert_logits(x)
        row["merged_forward_ms"] = 1e3 * best_time(lambda: merger.model(x), rounds=rounds,
                                                   device=device)
        row["entropy_weights_ms"] = 1e3 * best_time(lambda: ops.entropy_weights(logits, 0.05),
                                                    rounds=rounds, device=device)
        coeffs = torch.full((2, K), 1 / K, device=device)
        arena = merger.arena
        row["mix_ms"] = 1e3 * best_time(
            lambda: ops.mix(arena.buffer, coeffs, arena.bounds, out=merger.flat),
            rounds=rounds, device=device)
    for passes, m in mergers.items():
        row[f"merger_call_{passes}_ms"] = 1e3 * best_time(lambda: m(x), rounds=rounds,
                                                          device=device)
    passes_ms = min(row["expert_passes_loop_ms"], row["expert_passes_vmap_ms"])
    forwards = passes_ms + row["merged_forward_ms"]
    row["overhead_fraction"] = (row["entropy_weights_ms"] + row["mix_ms"]) / forwards
    row["mix_GBps"] = (K + 1) * arena.numel * arena.buffer.element_size() / row["mix_ms"] / 1e6
    if device == "cuda":
        row["copy_GBps"] = ceilings(device)["copy_GBps"]
    print("\n", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    _ROWS.append(row)
    record(f"online_{device}", [r for r in _ROWS if r["device"] == device], device)


@cases(STRATEGY_CASES)
def test_strategy_cost_per_batch(device, name, config, batch, dtype):
    experts = experts_for(config, dtype, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, config.image, config.image, generator=g)
    x[batch // 2:] = x[batch // 2:].flip(-1) * 2            # a second input distribution
    x = x.to(device, dtype)
    probe = TinyViT(config).to(device, dtype)
    records = [calibration_record(probe, e, x) for e in experts]
    rounds = 10 if device == "cuda" else 5
    base = {"model": name, "device": device, "dtype": str(dtype)[6:], "batch": batch, "K": K}
    passes = OnlineMerger(TinyViT(config).to(device, dtype), experts)
    with torch.no_grad():
        passes_ms = 1e3 * best_time(lambda: passes._expert_logits(x), rounds=rounds, device=device)
    for strategy, options in ONLINE_VARIANTS.items():
        options = {k: records if v == RECORDS else v for k, v in options.items()}
        merger = OnlineMerger(TinyViT(config).to(device, dtype), experts, **options)
        forwards = merger(x).merged_forwards
        call_ms = 1e3 * best_time(lambda: merger(x), rounds=rounds, device=device)
        row = {**base, "strategy": strategy, "options": ONLINE_VARIANTS[strategy],
               "default": strategy == DEFAULT, "command": COMMAND,
               "merger_call_ms": call_ms,
               "expert_passes_ms": passes_ms, "merged_forwards": forwards,
               "call_over_expert_passes": call_ms / passes_ms}
        print("\n", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        _ROWS.append(row)
    record(f"online_{device}", [r for r in _ROWS if r["device"] == device], device)
