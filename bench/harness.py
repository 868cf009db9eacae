"""Shared conventions for scoremerge benchmarks (DESIGN.md, "Measuring").

Every benchmark times the fast path and the plain-torch reference in the same process on the
same inputs and reports their ratio. On a GPU it also measures the device's ceilings in the same
run (copy bandwidth, matmul rate) and records absolute times with the device, versions, date and
command under bench/results/; on a CPU only the ratios count.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from scoremerge.doctor.environment import cpu_description, cpu_name

RESULTS = Path(__file__).parent / "results"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(x, answer):
    """Relative Frobenius error of x against the answer, in float64 on the CPU: the one helper
    the benchmarks measure errors with."""
    x, answer = x.detach().double().cpu(), answer.detach().double().cpu()
    return ((x - answer).norm() / answer.norm().clamp_min(1e-300)).item()


def best_time(fn, rounds=3, warmup=1, device="cpu"):
    """Minimum wall time of fn over rounds, after warmup calls, with device syncs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(*fns, rounds=3, device="cpu"):
    """Seconds per function (fast path first, reference after, as many as given): minima over
    rounds that alternate them, so that a noisy neighbour or a frequency change hits all alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], best_time(fn, rounds=1, warmup=0, device=device))
    return tuple(best)


def ceilings(device):
    """Copy bandwidth (GB/s) and fp32/bf16 matmul rates (TFLOP/s) measured on the device now."""
    n = 1 << 28 if torch.device(device).type == "cuda" else 1 << 24
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    copy_s = best_time(lambda: y.copy_(x), rounds=5, device=device)
    out = {"copy_GBps": 2 * x.numel() * 4 / copy_s / 1e9}
    size = 8192 if torch.device(device).type == "cuda" else 1024
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device).to(dtype)
        s = best_time(lambda: a @ a, rounds=5, device=device)
        out[f"matmul_{str(dtype).split('.')[-1]}_TFLOPs"] = 2 * size**3 / s / 1e12
    return out


def environment(device):
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return {"device": name, "threads": torch.get_num_threads(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "cpu": cpu_model()}


def record(name, rows, device):
    """Write rows (list of dicts) with the environment to bench/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**environment(device), "rows": rows}, indent=2) + "\n")
    return path


def machine_state():
    """What else the machine was doing: load averages and the busiest processes."""
    top = subprocess.run(["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu"], capture_output=True,
                         text=True).stdout.splitlines()[:8]
    return {"loadavg": os.getloadavg(), "busiest_processes": top}


def cpu_model():
    return f"{cpu_description()} x {os.cpu_count()}"
