"""LoRA experts merged in factored form (scoremerge.lora) against materialize-then-dense scoremerge
(api.merge_task_vectors on {key: scaling * B @ A}), the dense reference of the low-rank
convention (scoremerge.lora.reference: plain torch, the definition the factored path is tested
against) and PEFT's add_weighted_adapter(combination_type="svd"), on Llama-shaped adapters: time,
peak resident memory above the inputs, and agreement (largest relative Frobenius error of a
merged update over the keys). The experts are PEFT's own: a Llama model with T LoRA adapters of
non-zero random factors on all seven linear modules of every layer. Writes
bench/results/lora_merge.json.

    python bench/lora_merge.py [--hidden 2048 --intermediate 5632 --kv 256 --layers 1 --rank 16
                                --experts 4 --methods score tsv ... --dense-methods ...
                                --reference-methods ... --peft-ranks 16 --peft-full-matrices false]
"""
import argparse
import ctypes
import gc
import os
import subprocess
import time

import torch

from harness import record
from scoremerge import merge_task_vectors
from scoremerge.lora import LowRank, merge_adapters, reference

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["score", "tsv", "iso_c", "iso_cts", "task_arithmetic", "mean"]
_LIBC = ctypes.CDLL("libc.so.6")


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def measured(fn, rounds=1):
    """(fn(), the least seconds over `rounds` calls, the largest peak resident bytes above the
    resident size at a call's start). Several rounds for the fast paths: on a shared machine
    one call of a second can be slowed several times over by a neighbour."""
    best, peak = float("inf"), 0
    for _ in range(rounds):
        gc.collect()
        _LIBC.malloc_trim(0)      # hand freed heap pages back, so they are not reused unseen
        with open("/proc/self/clear_refs", "w") as f:      # resets VmHWM to the current RSS
            f.write("5")
        start_rss = _status("VmRSS:")
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, _status("VmHWM:") - start_rss)
    return out, best, peak


def peft_experts(args):
    """A PEFT Llama with T adapters e0..e{T-1}; its base state dict; the adapters as
    {key: LowRank} (PEFT's factors and scalings)."""
    import peft
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.kv // 64, vocab_size=256)
    base = transformers.LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=MODULES,
                           init_lora_weights=False)
    model = peft.get_peft_model(base, lora, adapter_name="e0")
    for t in range(1, args.experts):
        model.add_adapter(f"e{t}", lora)
    tvs = [{} for _ in range(args.experts)]
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "e0" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            for t, tv in enumerate(tvs):
                a = f"e{t}"
                tv[key] = LowRank(module.lora_B[a].weight.detach(),
                                  module.lora_A[a].weight.detach(), module.scaling[a])
    return model, state, tvs


def agreement(ours, theirs):
    """Largest relative Frobenius error of ours[key] (LowRank or dense) against theirs[key]."""
    worst = 0.0
    for key, want in theirs.items():
        got = ours[key].materialize() if isinstance(ours[key], LowRank) else ours[key]
        worst = max(worst, ((got.double() - want.double()).norm() / want.double().norm()).item())
    return worst


def method_rows(method, state, tvs, shapes, args):
    """Factored (adapter and full output) against the dense paths, for one method."""
    infos = {k: state[k] for k in shapes}
    adapter, t_ad, m_ad = measured(lambda: merge_adapters(infos, tvs, method, output="adapter"),
                                   args.rounds)
    _, t_full, m_full = measured(lambda: merge_adapters(infos, tvs, method, output="full"),
                                 args.rounds)
    row = {"method": method, "factored_adapter_s": t_ad, "factored_adapter_peak_MB": m_ad / 1e6,
           "factored_full_s": t_full, "factored_full_peak_MB": m_full / 1e6,
           "max_rank": max(u.rank for u in adapter.updates.values())}
    print(row, flush=True)
    if method in args.dense_methods:
        def dense():
            taus = [{k: u.materialize(torch.float32) for k, u in tv.items()} for tv in tvs]
            return merge_task_vectors(taus, method)

        api, t_api, m_api = measured(dense)
        row.update({"dense_api_s": t_api, "dense_api_peak_MB": m_api / 1e6,
                    "speedup_full_vs_dense_api": t_api / t_full,
                    "speedup_adapter_vs_dense_api": t_api / t_ad,
                    "rel_err_vs_dense_api": agreement(adapter.updates, api)})
        print(row, flush=True)
    if method in args.backend_check and method in args.dense_methods:
        # The same dense merge by the plain-torch backend: where the dense definition leaves
        # singular vectors of zero singular values to LAPACK, the two backends disagree.
        taus = [{k: u.materialize(torch.float32) for k, u in tv.items()} for tv in tvs]
        plain = merge_task_vectors(taus, method, backend="reference")
        row["rel_err_dense_api_vs_its_reference_backend"] = agreement(api, plain)
        print(row, flush=True)
    if method in args.reference_methods:
        ref, t_ref, m_ref = measured(lambda: reference.merge_factored(tvs, shapes, method))
        row.update({"dense_reference_s": t_ref, "dense_reference_peak_MB": m_ref / 1e6,
                    "rel_err_vs_dense_reference": agreement(adapter.updates, ref)})
        print(row, flush=True)
    return row


def peft_rows(model, state, tvs, shapes, args):
    """PEFT's svd combination (best rank-s approximation of the summed updates) against ours:
    task arithmetic, truncated to the same rank s."""
    import peft
    names, rows = [f"e{t}" for t in range(args.experts)], []
    infos = {k: state[k] for k in shapes}
    for svd_rank in args.peft_ranks or (args.rank, args.rank * args.experts):
        for full_matrices in args.peft_full_matrices:
            name = f"svd{svd_rank}_{int(full_matrices)}"
            _, t_peft, m_peft = measured(lambda: model.add_weighted_adapter(
                names, [1.0] * len(names), name, combination_type="svd", svd_rank=svd_rank,
                svd_full_matrices=full_matrices))
            theirs = {n.removeprefix("base_model.model.") + ".weight": m.get_delta_weight(name)
                      for n, m in model.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A}
            ours, t_ours, m_ours = measured(lambda: merge_adapters(
                infos, tvs, "task_arithmetic", output="adapter", rank=svd_rank), args.rounds)
            row = {"peft_svd_rank": svd_rank, "peft_full_matrices": full_matrices,
                   "peft_s": t_peft, "peft_peak_MB": m_peft / 1e6, "ours_s": t_ours,
                   "ours_peak_MB": m_ours / 1e6, "speedup": t_peft / t_ours,
                   "rel_err_ours_vs_peft": agreement(ours.updates, theirs),
                   "ours_max_truncation_error": max(ours.errors.values())}
            print(row, flush=True)
            rows.append(row)
            model.delete_adapter(name)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--kv", type=int, default=256, help="width of k_proj and v_proj (GQA)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--dense-methods", nargs="*", default=METHODS,
                   help="methods also run materialize-then-dense (api.merge_task_vectors)")
    p.add_argument("--reference-methods", nargs="*", default=METHODS,
                   help="methods also run by the plain-torch dense reference of the convention")
    p.add_argument("--backend-check", nargs="*", default=[],
                   help="dense methods also run by api's plain-torch reference backend")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each factored merge")
    p.add_argument("--peft-ranks", type=int, nargs="*", default=None,
                   help="svd_rank values for PEFT's svd combination (default: r and T * r)")
    p.add_argument("--peft-full-matrices", nargs="+", default=[True, False],
                   type=lambda v: {"true": True, "false": False}[v.lower()],
                   help="svd_full_matrices values for PEFT (true false)")
    p.add_argument("--name", default="lora_merge")
    args = p.parse_args()
    load_before = os.getloadavg()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    model, state, tvs = peft_experts(args)
    shapes = {k: tuple(state[k].shape) for k in tvs[0]}
    with torch.no_grad():
        rows = [method_rows(m, state, tvs, shapes, args) for m in args.methods]
        peft = peft_rows(model, state, tvs, shapes, args)
    machine = {"settings": vars(args), "keys": len(shapes), "uptime_before": uptime_before,
               "uptime_after": subprocess.run(["uptime"], capture_output=True,
                                              text=True).stdout.strip(),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "cpus": os.cpu_count()}
    path = record(args.name, {"methods": rows, "peft_svd": peft, **machine}, "cpu")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
