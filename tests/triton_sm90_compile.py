"""Compile every Triton kernel variant for Hopper (sm_90) without a GPU, through triton's own
ptxas: catches what the interpreter cannot (types, constexpr specialisation, layouts).
Run by test_triton_kernels.py in a subprocess with TRITON_INTERPRET unset."""
import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scoremerge.ops.mixing import triton as mix_mod
from scoremerge.ops.projection import triton as pm
from scoremerge.ops.projection import triton_bmm as bmm_mod

target = GPUTarget("cuda", 90, 32)



def sig_for(fn, types, constexprs):
    names = inspect.signature(fn.fn).parameters
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        else:
            sig[n] = types.get(n, "i32")
    return sig



def constexpr_slots(fn, values):
    names = list(inspect.signature(fn.fn).parameters)
    return {(names.index(n),): v for n, v in values.items()}


k = bmm_mod._bmm_kernel
for dt in ("fp32", "fp64"):
    for stats, axpby, prec in ((True, False, "ieee"), (False, True, "ieee"),
                               (False, False, "tf32x3"), (False, False, "tf32")):
        if dt == "fp64" and prec != "ieee":
            continue
        out_type = "*bf16" if axpby else f"*{dt}"     # the reconstruction stores bf16 models
        types = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": out_type, "base_ptr": out_type,
                 "partial_ptr": "*fp64", "alpha_ptr": "*fp64"}
        cx = {"STATS": stats, "AXPBY": axpby, "PRECISION": prec, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}
        src = ASTSource(fn=k, signature=sig_for(k, types, cx), constexprs=constexpr_slots(k, cx))
        out = triton.compile(src, target=target, options={"num_warps": 8, "num_stages": 3})
        print("bmm", dt, stats, axpby, prec, "ok", len(out.asm["cubin"]))
k = pm._mask_sum_kernel
for dt in ("fp32", "fp64"):
    for variant in (0, 1, 2, 3):
        types = {"m_ptr": f"*{dt}", "stats_ptr": "*fp64", "s_ptr": f"*{dt}"}
        cx = {"VARIANT": variant, "BLOCK": 32}
        src = ASTSource(fn=k, signature=sig_for(k, types, cx), constexprs=constexpr_slots(k, cx))
        out = triton.compile(src, target=target, options={"num_warps": 4})
        print("mask", dt, variant, "ok", len(out.asm["cubin"]))
k = mix_mod._mix_kernel
for src, dst, wide in (("bf16", "bf16", False), ("fp32", "fp32", False), ("fp16", "fp32", False),
                       ("fp64", "fp64", True)):
    types = {"experts_ptr": f"*{src}", "coeffs_ptr": "*fp32", "out_ptr": f"*{dst}",
             "block_group_ptr": "*i32", "block_start_ptr": "*i64", "block_end_ptr": "*i64"}
    cx = {"K": 4, "WIDE": wide, "BLOCK": mix_mod.BLOCK}
    src_ast = ASTSource(fn=k, signature=sig_for(k, types, cx), constexprs=constexpr_slots(k, cx))
    out = triton.compile(src_ast, target=target, options={"num_warps": 8})
    print("mix", src, dst, "ok", len(out.asm["cubin"]))
