"""doctor's text output: a screenful a person reads at a glance (the JSON holds every number)."""

DTYPE_COLUMNS = ("float32", "bfloat16", "float64")
NAMED = ("cuda", "triton", "torch")


def environment_lines(env):
    triton, cupy, ext = env["triton"], env["cupy"], env["extension"]
    triton_text = _or_dash(triton["version"]) + (
        " (CPU interpreter)" if triton.get("interpreter") else "")
    lines = [f"  scoremerge {env['scoremerge']}  python {env['python']}  torch {env['torch']} "
             f"(CUDA {env['torch_cuda'] or '-'})  triton {triton_text}  "
             f"cupy {_or_dash(cupy['version'])}",
             f"  device: {_device_text(env['device'])}; CUDA driver "
             f"{_or_dash(env['cuda_driver']['version'])}"]
    if ext["built"]:
        archs = " ".join(ext.get("sass", [])) + "".join(f" +PTX {p}" for p in ext.get("ptx", []))
        runs = {True: "; runs here", False: "; cannot run here"}.get(ext.get("runs_here"), "")
        lines.append(f"  scoremerge._C: built for {archs or '?'}, CUDA runtime "
                     f"{ext.get('cuda_runtime', '?')}{runs}{_note(ext)}")
    else:
        lines.append(f"  scoremerge._C: not built{_note(ext)}")
    cpu = env["cpu_extension"]
    if cpu["built"]:
        used = [name for name, key in (("TIES ranking", "ties_ranking"),
                                       ("fused task arithmetic and linear", "fused_entrywise"))
                if cpu[key]]
        lines.append("  scoremerge._cpu: built; used for " + (", ".join(used) or
                     "nothing (its results differ from torch's here)"))
    else:
        lines.append(f"  scoremerge._cpu: not built{_note(cpu)}")
    gemm = env["cpu_matmul"]
    lines.append(f"  float32 CPU products of the SVD routes: "
                 f"{gemm['chosen_by'] if gemm['library'] else 'unset'}{_note(gemm)}")
    eigh, nvrtc = env["cusolver_batched_eigh"], env["nvrtc"]
    lines.append(f"  cuSOLVER batched eigensolver: {'found' if eigh['found'] else 'not found'}"
                 f"{_note(eigh)}")
    lines.append(f"  NVRTC: {('found ' + nvrtc['version']) if nvrtc['found'] else 'not found'}; "
                 f"CUDA mix kernel from: {env['cuda_mix_path']['path'] or '-'}")
    return lines


def availability_lines(table, auto, device):
    """One row per op, a column per backend: yes (auto's choice starred), no (footnoted reason),
    or - where scoremerge has no such kernel."""
    reasons, lines = [], [(f"  {'op':17s}" + "".join(f"{name:10s}" for name in NAMED)).rstrip()]
    for op, row in table.items():
        cells = []
        for name in NAMED:
            why = row[name]
            if why is not None and why.startswith("scoremerge has no"):
                cells.append("-")
            elif why is not None:
                if why not in reasons:
                    reasons.append(why)
                cells.append(f"no ({reasons.index(why) + 1})")
            else:
                cells.append("yes *" if auto.get(op) == name else "yes")
        lines.append((f"  {op:17s}" + "".join(f"{c:10s}" for c in cells)).rstrip())
    lines += [f"  ({i}) {why}" for i, why in enumerate(reasons, 1)]
    return [f"backends on {device} (* auto's choice)"] + lines


def check_header():
    return ["checks: error / earned bound, against the float64 reference",
            (f"  {'op':17s}{'backend':8s}" + "".join(f"{d:21s}" for d in DTYPE_COLUMNS)).rstrip()]


def check_row(results):
    """One op on one backend, its dtypes side by side."""
    first = results[0]
    by_dtype = {r.dtype: r for r in results}
    cells = [_cell(by_dtype.get(d)) for d in DTYPE_COLUMNS]
    return f"  {first.op:17s}{first.backend:8s}" + "".join(f"{c:21s}" for c in cells).rstrip()


def merge_lines(results, auto_text):
    lines = [f"merges through auto ({auto_text}), float32, error over the whole model / bound"]
    for r in results:
        lines.append(f"  {r.op:17s}{_cell(r)}")
    return lines


def failure_text(result):
    where = f"{result.op} on {result.backend} ({result.dtype})"
    if result.note:
        return f"{where} raised {result.note}"
    return (f"{where}: {result.output} error {result.error:.2e} > bound {result.bound:.2e}")


def verdict_lines(failures, n_checks, n_merges, incomplete=False):
    if failures:
        return [f"verdict: FAIL ({len(failures)} of {n_checks + n_merges})"] + \
               [f"  {text}" for text in failures]
    if incomplete:
        return ["verdict: INCOMPLETE"]
    return [f"verdict: OK: every available backend agrees with the reference ({n_checks} op "
            f"checks, {n_merges} merges)"]


def bench_lines(bench):
    ceil = bench["ceilings"]
    head = (f"bench on {bench['device']}: copy {ceil['copy_GBps']:.0f} GB/s, matmul fp32 "
            f"{ceil['matmul_float32_TFLOPs']:.2f} TFLOP/s" +
            (f", bf16 {ceil['matmul_bfloat16_TFLOPs']:.2f}" if "matmul_bfloat16_TFLOPs" in ceil
             else "") + " (measured now)")
    lines = [head, f"  {'case':30s}{'fast path':14s}{'fast s':>9s}{'ref s':>9s}{'ratio':>8s}  "
                   "rate (of ceiling)"]
    for row in bench["rows"]:
        lines.append(_bench_row(row))
    return lines


def _bench_row(row):
    if "error" in row:
        return f"  {row['case']:30s}{row.get('fast', '?'):14s} failed: {row['error']}"
    rate = (f"{row['GBps']:.0f} GB/s ({row['of_copy']:.0%} of copy)" if "GBps" in row
            else f"{row['TFLOPs']:.2f} TFLOP/s ({row['of_matmul']:.0%} of fp32 matmul)"
            if "TFLOPs" in row else "")
    return (f"  {row['case']:30s}{row['fast']:14s}{row['fast_s']:9.4f}{row['ref_s']:9.4f}"
            f"{row['ratio']:7.1f}x  {rate}")


def _cell(result):
    if result is None:
        return "-"
    if result.note:
        return "FAIL (raised)"
    return f"{'ok' if result.ok else 'FAIL'} {result.error:.1e}/{result.bound:.1e}"


def _device_text(device):
    if device["type"] == "cuda":
        return f"{device['name']} ({device['capability']}, {device['memory_GB']} GB)"
    generation = f" ({device['generation']})" if device.get("generation") else ""
    return f"{device['name']} CPU{generation}, {device['threads']} threads"


def _or_dash(value):
    return value if value else "-"


def _note(status):
    return f" ({status['note']})" if status.get("note") else ""
