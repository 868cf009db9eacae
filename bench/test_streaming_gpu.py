"""The streaming merge on a GPU: a 7B-shaped SCORE merge with T = 4 experts from local
disk, against the time to read its inputs, same process. Skipped without CUDA.

The model: LAYERS decoder layers of a 7B (q, k, v, o 4096 x 4096; gate, up 11008 x 4096; down
4096 x 11008; bf16), a base and four experts written to local disk first (LAYERS = 2 keeps the
five checkpoints near 4 GB; the H200 machine has 64 GB of disk, a whole 7B needs 70 GB). Reported:
read bandwidth, compute, write, total, the overlap (sum of the stages / total), and the total
extrapolated to 32 layers (labelled as such). The inputs were just written, so the reads may
come from the page cache; the script asks the kernel to drop it first and records whether it
could.

    python -m pytest bench/test_streaming_gpu.py -s
"""
import subprocess
import time
from pathlib import Path

import pytest
import torch

from scoremerge.io import save_state_dict
from scoremerge.io.checkpoint import Checkpoint
from scoremerge.streaming import merge_checkpoints

from harness import record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYERS = 2
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
          "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
          "down_proj": (4096, 11008)}


def write_models(root):
    g = torch.Generator(device="cuda").manual_seed(0)
    base = {f"model.layers.{i}.{name}.weight": torch.randn(*shape, device="cuda", generator=g)
            .mul_(0.02).to(torch.bfloat16) for i in range(LAYERS) for name, shape in SHAPES.items()}
    paths = [save_state_dict({k: v.cpu() for k, v in base.items()}, root / "base",
                             max_shard_size="1GB")]
    for t in range(4):
        expert = {k: (v.float() + 1e-3 * torch.randn(v.shape, device="cuda", generator=g))
                  .to(torch.bfloat16).cpu() for k, v in base.items()}
        paths.append(save_state_dict(expert, root / f"expert{t}", max_shard_size="1GB"))
    return paths


def drop_page_cache():
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def test_7b_layers_score_merge_against_reading(tmp_path):
    paths = write_models(tmp_path)
    dropped = drop_page_cache()
    t0 = time.perf_counter()
    nbytes = 0
    for p in paths:
        ckpt = Checkpoint(p)
        for key in ckpt.infos:
            nbytes += ckpt.read(key).numel() * 2
    read_only_s = time.perf_counter() - t0
    drop_page_cache()
    stats = merge_checkpoints(paths[0], paths[1:], tmp_path / "out", "score", device="cuda",
                              progress=False)
    stages = stats["read_s"] + stats["compute_s"] + stats["write_s"]
    row = {"layers": LAYERS, "experts": 4, "method": "score", "GB_read": nbytes / 1e9,
           "page_cache_dropped": dropped, "read_only_s": read_only_s,
           "read_only_GBps": nbytes / 1e9 / read_only_s, "merge_s": stats["seconds"],
           "read_s": stats["read_s"], "compute_s": stats["compute_s"],
           "write_s": stats["write_s"], "overlap": stages / stats["seconds"],
           "merge_over_read": stats["seconds"] / read_only_s,
           "extrapolated_32_layers_s": stats["seconds"] * 32 / LAYERS,
           "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9}
    print("\n", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    record("streaming_gpu", [row], "cuda")
